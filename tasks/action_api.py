"""Fetch revision texts from the MediaWiki Action API, politely, in batches of at most 50.

The request and its answer, as documented (https://www.mediawiki.org/wiki/API:Revisions,
https://www.mediawiki.org/wiki/Manual:Maxlag_parameter, https://www.mediawiki.org/wiki/API:Etiquette):

    GET <api>?action=query&prop=revisions&revids=1|2|...&rvprop=ids|timestamp|content&rvslots=main
             &format=json&formatversion=2&maxlag=5

    {"batchcomplete": true,
     "query": {"badrevids": {"7": {"revid": 7, "missing": true}},
               "pages": [{"pageid": 12, "ns": 0, "title": "Anarchism",
                          "revisions": [{"revid": 1, "parentid": 0, "timestamp": "...",
                                         "slots": {"main": {"contentmodel": "wikitext", "content": "..."}}}]}]},
     "continue": {"rvcontinue": "...", "continue": "||"}}      (only when the answer was cut short)

- at most 50 `revids` per request (500 for bots; 50 is everyone's limit, and with content it is enforced);
- a revision deleted (with its page, or on its own) is listed in `badrevids`; a revision whose text is
  revision-deleted comes with `"texthidden": true` in its slot and no `content`. Both mean the text
  is gone: `fetch_revisions` answers None for it, which the live path applies as a removal;
- `maxlag=5` as Wikimedia asks of non-interactive clients: over the lag, the API answers (HTTP 200, or 503)
  `{"error": {"code": "maxlag", "info": "Waiting for $host: $lag seconds lagged", "lag": ...}}` with a
  `Retry-After` header; 429 (rate limited) and 503 also carry `Retry-After`. All three are retried
  after that many seconds (bounded), then the fetch fails in one line;
- a descriptive User-Agent (the Wikimedia User-Agent policy) on every request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from storage.errors import RagindexError

BATCH = 50
DEFAULT_API_URL = "https://en.wikipedia.org/w/api.php"


class ApiError(RagindexError):
    """The Action API could not be read, or kept refusing, after all retries."""


@dataclass(frozen=True)
class Revision:
    page_id: int
    rev_id: int
    title: str
    ns: int
    timestamp: str
    model: str
    text: str


def fetch_revisions(api_url: str, rev_ids: Iterable[int], *, user_agent: str, maxlag: int = 5,
                    retries: int = 6, max_wait_s: float = 60.0,
                    timeout_s: float = 60.0) -> dict[int, Revision | None]:
    """Each revision's text, or None where the revision (or its text) is deleted or hidden."""
    wanted = sorted(set(rev_ids))
    found: dict[int, Revision | None] = {}
    with httpx.Client(headers={"User-Agent": user_agent}, timeout=timeout_s) as client:
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start:start + BATCH]
            params: dict[str, Any] = {
                "action": "query", "prop": "revisions", "revids": "|".join(map(str, batch)),
                "rvprop": "ids|timestamp|content", "rvslots": "main", "format": "json", "formatversion": "2",
                "maxlag": str(maxlag),
            }
            while True:
                answer = _get(client, api_url, params, retries=retries, max_wait_s=max_wait_s)
                _collect(answer, found)
                more = answer.get("continue")
                if not more:
                    break
                params = {**params, **more}
            for rev_id in batch:
                found.setdefault(rev_id, None)  # not in the answer at all: gone as far as we can tell
    return found


def _collect(answer: dict[str, Any], found: dict[int, Revision | None]) -> None:
    query = answer.get("query") or {}
    bad = query.get("badrevids") or {}
    for value in bad.values() if isinstance(bad, dict) else bad:
        found[int(value["revid"])] = None
    for page in query.get("pages") or []:
        for revision in page.get("revisions") or []:
            slot = (revision.get("slots") or {}).get("main") or {}
            rev_id = int(revision["revid"])
            if slot.get("texthidden") or "content" not in slot:
                found[rev_id] = None
                continue
            found[rev_id] = Revision(page_id=int(page["pageid"]), rev_id=rev_id, title=page["title"],
                                     ns=int(page.get("ns", 0)), timestamp=revision.get("timestamp", ""),
                                     model=slot.get("contentmodel", "wikitext"), text=slot["content"])


def _get(client: httpx.Client, url: str, params: dict[str, Any], *, retries: int,
         max_wait_s: float) -> dict[str, Any]:
    why = ""
    for attempt in range(retries + 1):
        try:
            response = client.get(url, params=params)
        except httpx.TransportError as exc:
            why, wait = f"{type(exc).__name__}: {exc}", min(2.0 ** attempt, max_wait_s)
        else:
            answer = _json(response) if response.status_code == 200 else None
            error = (answer or {}).get("error") or {}
            if response.status_code == 200 and error.get("code") != "maxlag":
                if error:
                    raise ApiError(f"Action API {url}: {error.get('code')}: {error.get('info', '')}"[:300])
                return answer or {}
            if response.status_code not in (200, 429, 503) and response.status_code < 500:
                raise ApiError(f"Action API {url} answered HTTP {response.status_code}")
            why = "maxlag: " + str(error.get("info", "")) if error else f"HTTP {response.status_code}"
            wait = _retry_after(response, default=min(2.0 ** attempt, max_wait_s), cap=max_wait_s)
        if attempt < retries:
            time.sleep(wait)
    raise ApiError(f"Action API {url} still refusing after {retries + 1} attempts ({why})")


def _retry_after(response: httpx.Response, *, default: float, cap: float) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), cap)
    except ValueError:
        return default  # absent, or an HTTP date: back off on our own schedule


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        answer = response.json()
    except ValueError:
        raise ApiError(f"Action API {response.request.url.host} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise ApiError(f"Action API {response.request.url.host} answered JSON that is not an object")
    return answer
