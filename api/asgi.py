"""ASGI entry point (``uvicorn api.asgi:app``).

Each uvicorn worker imports this module on its own, so it configures its own logging
and builds its app from the environment.
"""

from api.app import create_app
from api.settings import ApiSettings
from runtime.logs import configure

_settings = ApiSettings()
configure(_settings.log_level, _settings.log_format)
app = create_app(_settings)
