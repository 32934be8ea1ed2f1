"""Content Service client: essay text by `text_storage_id`, with timeout and bounded retries."""

from __future__ import annotations

import asyncio
from typing import Protocol
from urllib.parse import quote

import aiohttp
import structlog
from yarl import URL

from cj_assessment.errors import ContentUnavailable

log = structlog.get_logger(__name__)


class ContentClient(Protocol):
    async def fetch(self, essay_id: str, text_storage_id: str) -> str: ...


class HttpContentClient:
    def __init__(self, base_url: str, *, timeout_seconds: float, attempts: int) -> None:
        # Encoded once here (a space or an "ä" in the configured URL), since each fetch's URL
        # is sent as written.
        self._base_url = str(URL(base_url.rstrip("/")))
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._attempts = attempts
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, essay_id: str, text_storage_id: str) -> str:
        if not text_storage_id:
            raise ContentUnavailable(essay_id, "no text_storage_id")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        # One path segment whatever the id holds: "/", "?", "#" or "%" in an id must not reach
        # another resource than the essay's own.
        segment = quote(text_storage_id, safe="")
        if segment in {".", ".."}:  # a URL would resolve these to the parent resource
            segment = segment.replace(".", "%2E")
        # Sent as written: parsing would decode "%2E" and resolve the dots again.
        url = URL(f"{self._base_url}/{segment}", encoded=True)
        reason = "unknown"
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.get(url) as response:
                    if response.status == 200:
                        try:
                            return await response.text()
                        except (UnicodeDecodeError, LookupError) as exc:
                            # The same bytes come back on every attempt.
                            raise ContentUnavailable(essay_id, "text is not decodable") from exc
                    reason = f"HTTP {response.status}"
                    if 400 <= response.status < 500 and response.status != 429:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            log.warning("content_fetch_retry", essay_id=essay_id, attempt=attempt, reason=reason)
            if attempt < self._attempts:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
        raise ContentUnavailable(essay_id, reason)
