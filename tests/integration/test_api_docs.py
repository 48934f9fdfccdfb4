"""The interactive documentation (/docs) is served whole by the api: its page loads
nothing from another origin, so it works where the api has no internet and trusts no
CDN (what a CDN served would run with the page's origin, next to the API key a user
types in)."""

from __future__ import annotations

import re

import httpx

from taskbox.api.settings import ApiSettings
from tests.integration.conftest import app_client_for

# Every URL the page makes the browser fetch: src=, href=, and Swagger UI's `url:` (the
# OpenAPI document).
_REFERENCES = re.compile(r"""(?:\bsrc|\bhref)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")


def referenced(html: str) -> list[str]:
    return [src or url for src, url in _REFERENCES.findall(html)]


async def test_docs_reference_only_the_apis_own_assets(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    # No absolute or protocol-relative URL anywhere in the page, not only in src/href.
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]", html), html
    urls = referenced(html)
    assert {url.rsplit(".", 1)[-1] for url in urls} >= {"js", "css", "json"}, urls
    for url in urls:
        assert url.startswith("/"), url


async def test_docs_assets_are_served_by_the_api(client: httpx.AsyncClient) -> None:
    urls = referenced((await client.get("/docs")).text)
    types = {"js": "javascript", "css": "text/css", "json": "application/json", "png": "image/"}
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        assert types[url.rsplit(".", 1)[-1]] in asset.headers["content-type"], (url, asset.headers)
        assert asset.content, url
    script = next(url for url in urls if url.endswith(".js"))
    # The real Swagger UI bundle, not a stub: it defines what the page calls.
    assert "SwaggerUIBundle" in (await client.get(script)).text


async def test_redoc_is_not_served_since_it_would_come_from_a_cdn(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/redoc")).status_code == 404


async def test_docs_and_their_assets_stay_public_with_api_keys(
    api_settings: ApiSettings,
) -> None:
    settings = ApiSettings(
        database_url=api_settings.database_url,
        outbox_channel=api_settings.outbox_channel,
        api_keys="docs-key-77a1",
    )
    async with app_client_for(settings) as client:
        assert (await client.get("/api/v1/tasks")).status_code == 401
        page = await client.get("/docs")
        assert page.status_code == 200, page.text
        for url in referenced(page.text):
            assert (await client.get(url)).status_code == 200, url
