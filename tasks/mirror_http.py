"""The HTTP client of a dumps mirror, shared by full dumps (tasks.download) and adds-changes days
(tasks.incr_dumps): GETs retried with backoff, redirects kept on the mirror's host, and the dated
directories a mirror's HTML listing names."""

from __future__ import annotations

import re
import time
from types import TracebackType

import httpx

from storage.errors import RagindexError, Rejected

_DATE_DIR_LINK = re.compile(r'href="(\d{8})/?"')


class DownloadError(RagindexError):
    """The mirror could not be reached, or refused a file, after all retries."""


class MirrorHttp:
    """GETs to one mirror. Redirects are followed only while they stay on the mirror's host: a
    mirror (or anyone who can answer for it) must not send the build worker to another server."""

    def __init__(self, user_agent: str, retries: int = 3, backoff_s: float = 1.0, timeout_s: float = 30.0,
                 host: str | None = None):
        self.host = host
        self.client = httpx.Client(headers={"User-Agent": user_agent}, timeout=timeout_s,
                                   follow_redirects=True, event_hooks={"request": [self._stay_on_host]})
        self.retries = retries
        self.backoff_s = backoff_s

    def __enter__(self) -> MirrorHttp:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def _stay_on_host(self, request: httpx.Request) -> None:
        # Runs for every request the client sends, the redirected ones included.
        if self.host is None:
            self.host = request.url.host
        elif request.url.host != self.host:
            raise Rejected(f"refusing a redirect from the mirror {self.host} to another host: {request.url}")

    def get(self, url: str) -> httpx.Response | None:
        """The response, or None on 404. Transient failures are retried with backoff."""
        for attempt in range(self.retries + 1):
            try:
                response = self.client.get(url)
            except httpx.HTTPError as exc:
                if attempt == self.retries:
                    raise DownloadError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
            else:
                if response.status_code == 404:
                    return None
                if response.status_code < 400:
                    return response
                if response.status_code < 500 and response.status_code != 429 or attempt == self.retries:
                    raise DownloadError(f"{url}: HTTP {response.status_code}")
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def listed_dates(listing: httpx.Response) -> set[str]:
    """The YYYYMMDD directories a mirror's HTML directory listing links to."""
    return set(_DATE_DIR_LINK.findall(listing.text))
