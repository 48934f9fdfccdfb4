"""``python -m api``: serve the REST API with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from api.auth import exposure_refusal
from api.settings import ApiSettings
from runtime.logs import configure
from runtime.settings import describe_invalid

log = logging.getLogger("api")

EXIT_USAGE = 2  # refused to start; the message says which setting to change


def main() -> int:
    try:
        settings = ApiSettings()
    except ValidationError as exc:
        print(describe_invalid(exc), file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_level, settings.log_format)
    refusal = exposure_refusal(settings)
    if refusal is not None:
        log.critical("%s", refusal)
        return EXIT_USAGE
    uvicorn.run(
        "api.asgi:app",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,  # keep the logging configured above
        access_log=settings.api_access_log,
        proxy_headers=True,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
