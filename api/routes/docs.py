"""The interactive documentation at /docs: Swagger UI, served by the api itself.

FastAPI's own /docs page loads Swagger UI from a CDN: it stays blank where the api has
no internet, and whatever the CDN serves runs on the api's origin, beside the API key a
reader types into the page. Here the page and its files come from the api: the files
from the ``swagger-ui-bundle-v2`` package (Swagger UI's dist, Apache-2.0 like Swagger
UI, pinned in requirements.lock like every dependency). Only the three files the page
loads are served, not the package's whole folder (its sample index.html would fetch
the petstore document from the internet). ReDoc (/redoc) is not served: no package
ships it, and FastAPI's page for it loads from a CDN too.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
_SWAGGER_UI = Path(str(swagger_ui_path))
# The files the page references, with the media type each is served as.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH)
async def swagger_ui(request: Request) -> HTMLResponse:
    # Behind a proxy serving the api under a prefix (uvicorn --root-path), the browser
    # must ask for the prefixed paths; FastAPI's own page does the same.
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return get_swagger_ui_html(
        openapi_url=root + str(request.app.openapi_url),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
    )


@router.get(ASSETS_PATH + "/{name}")
async def swagger_ui_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404)
    return FileResponse(_SWAGGER_UI / name, media_type=media_type)
