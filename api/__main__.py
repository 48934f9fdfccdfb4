"""``python -m api``: serve the REST API with uvicorn."""

from __future__ import annotations

import uvicorn

from api.connection_limits import ConnectionLimits, limited_protocol
from api.settings import ApiSettings
from runtime.logs import configure


def main() -> None:
    settings = ApiSettings()
    configure(settings.log_level, settings.log_format)
    uvicorn.run(
        "api.asgi:app",
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,  # keep the logging configured above
        access_log=settings.api_access_log,
        proxy_headers=True,
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
    )


if __name__ == "__main__":
    main()
