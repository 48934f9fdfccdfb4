# Taskbox: one image for every process; the command picks it.
#   taskbox api (default)  |  taskbox relay  |  taskbox consumer  |  taskbox migrate  |  ...
# Configuration comes from the environment at run time (docker-compose.yml, .env); the
# image holds no settings but API_HOST.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: a venv with Taskbox and its runtime dependencies (no dev extras) ----------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# --without-pip: the venv gets neither pip nor setuptools; the base image's pip installs
# into it (--python), so the final stage carries no installer.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src
# The pinned dependencies first, in their own layer: code changes do not reinstall them.
COPY requirements.lock ./
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
# taskbox/api, relay, consumer and db are links to the folders at the root (README,
# "Development"): the build follows them, so all of it installs under taskbox.*.
COPY api/ api/
COPY consumer/ consumer/
COPY db/ db/
COPY relay/ relay/
COPY taskbox/ taskbox/
COPY tasktypes/ tasktypes/

# A regular (non-editable) install: the packages, the alembic migrations (package data)
# and the dependencies land in the venv's site-packages. Then prove that every entry
# point imports from the installed copy (-I: /src is not on sys.path).
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps . \
    && /opt/venv/bin/python -I -c "import taskbox.api.__main__, taskbox.relay.__main__, taskbox.consumer.__main__, taskbox.db.__main__, taskbox.cli"

# --- final: the venv only, run as an unprivileged user -----------------------------------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    API_HOST=0.0.0.0

RUN groupadd --system --gid 10001 taskbox \
    && useradd --system --uid 10001 --gid taskbox --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin taskbox

COPY --from=builder /opt/venv /opt/venv

# No .env in here: settings come from the container's environment.
WORKDIR /app
# numeric, so that runAsNonRoot-style checks can verify it without /etc/passwd
USER 10001:10001

EXPOSE 8000

# The api's liveness endpoint (urllib: the slim image has no curl). docker-compose.yml
# replaces it for the relay and the consumer with their own /healthz on the metrics port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('API_PORT', '8000'), timeout=2)"]

CMD ["taskbox", "api"]
