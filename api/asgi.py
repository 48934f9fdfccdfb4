"""ASGI entry point (``uvicorn taskbox.api.asgi:app``).

Each uvicorn worker imports this module on its own, so it configures its own logging
and tracing (its own exporter: runtime.telemetry) and builds its app from the
environment. Invalid settings end the import with their
reasons, secrets masked, not with pydantic's error, which uvicorn would print whole.
"""

from taskbox.api.app import create_app
from taskbox.api.settings import ApiSettings
from taskbox.runtime.logs import configure
from taskbox.runtime.settings import settings_or_exit
from taskbox.runtime.telemetry import start_tracing

_settings = settings_or_exit(ApiSettings)
configure(_settings.log_level, _settings.log_format)
app = create_app(_settings, start_tracing(_settings, "taskbox-api"))
