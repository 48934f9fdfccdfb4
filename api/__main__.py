"""``taskbox api`` (``python -m taskbox.api``): serve the REST API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from taskbox.api.auth import exposure_refusal
from taskbox.api.connection_limits import ConnectionLimits, limited_protocol
from taskbox.api.settings import ApiSettings
from taskbox.runtime.logs import configure
from taskbox.runtime.settings import settings_or_exit

log = logging.getLogger("taskbox.api")

EXIT_USAGE = 2  # refused to start; the message says which setting to change


GRACEFUL_SHUTDOWN_SECONDS = 5


def main(argv: list[str] | None = None, prog: str = "python -m taskbox.api") -> int:
    argparse.ArgumentParser(
        prog=prog,
        description="Serve the Taskbox REST API with uvicorn on API_HOST:API_PORT; "
        "the settings come from the environment (see README, Configuration).",
    ).parse_args(argv)
    settings = settings_or_exit(ApiSettings)
    configure(settings.log_level, settings.log_format)
    refusal = exposure_refusal(settings)
    if refusal is not None:
        log.critical("%s", refusal)
        return EXIT_USAGE
    uvicorn.run(
        "taskbox.api.asgi:app",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,  # keep the logging configured above
        access_log=settings.api_access_log,
        # X-Forwarded-For/-Proto only from the proxies named; uvicorn itself would
        # believe any local peer (FORWARDED_ALLOW_IPS' default there is 127.0.0.1).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips,
        server_header=False,
        http=limited_protocol(
            ConnectionLimits(
                max_header_bytes=settings.api_max_header_bytes,
                header_timeout=settings.api_header_timeout,
                body_timeout=settings.api_body_timeout,
                keep_alive_timeout=settings.api_keep_alive_timeout,
            )
        ),
        limit_concurrency=settings.api_concurrency_limit,
        # On SIGTERM uvicorn waits for open connections to finish: an event stream or a
        # long poll would hold the stop for up to TASK_EVENTS_MAX_STREAM / TASK_WAIT_MAX.
        # Past this they are cut (EventSource reconnects, to another api if there is one).
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
