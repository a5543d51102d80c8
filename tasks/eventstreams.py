"""Read a wiki's page changes from Wikimedia EventStreams, and reduce them to each page's final state.

The formats, as published (checked against the sources, not guessed):

- EventStreams (https://wikitech.wikimedia.org/wiki/Event_Platform/EventStreams, and the service's own
  README, github.com/wikimedia/mediawiki-services-eventstreams): server-sent events at
  `<streams>/v2/stream/<stream>[,<stream>...]`, one connection for several streams. Every event's SSE
  `id:` is a JSON list of `{topic, partition, offset | timestamp}` objects, the client's position in
  every partition it reads (github.com/wikimedia/KafkaSSE, README; since 2018 timestamps, not offsets:
  lists.wikimedia.org analytics, "making EventStreams multi-DC"). Sending it back as `Last-Event-ID`
  resumes from there; a timestamp position may deliver the last event again. `?since=<ISO-8601>`
  starts from a time (wikimediafoundation.org/news/2018/08/08/eventstreams-updates/); the streams keep
  about 7 days (`RETENTION`). Server side filtering does not exist: the wiki is filtered here.
- Event bodies: the JSON schemas of github.com/wikimedia/schemas-event-primary,
  `jsonschema/mediawiki/revision/create/1.2.0`, `page/delete/1.0.0`, `page/move/1.0.0`,
  `page/undelete/1.0.0`, `revision/visibility-change/1.0.0`. Every one requires `database`, `page_id`,
  `page_title`, `page_namespace`, `rev_id` (for delete, move and undelete: the page's head revision at
  the event) and `meta.dt` / `meta.stream` (`meta.id`, the event's uuid, is what duplicates share).
  A move also has `prior_state.page_namespace` / `prior_state.page_title`; a visibility change has
  `visibility.text` (false: the revision's text is hidden).

A read (`read_changes`) keeps the served wiki's main namespace (and moves into or out of it), drops
duplicates, reconnects with `Last-Event-ID` when the connection breaks mid-stream, and stops at the
first event newer than `until` (that event stays unread: the position is the last event kept) or when
the stream stays quiet for `idle_s`. `final_states` then orders each page's events by revision id
(then event time), so partitions delivered out of order, and replays, end in the same state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from httpx_sse import SSEError, connect_sse

from storage.errors import RagindexError, Rejected

STREAMS = (
    "mediawiki.revision-create",
    "mediawiki.page-delete",
    "mediawiki.page-move",
    "mediawiki.page-undelete",
    "mediawiki.revision-visibility-change",
)
RETENTION = timedelta(days=7)
DEFAULT_STREAMS_URL = "https://stream.wikimedia.org"

Kind = Literal["edit", "delete", "move", "undelete", "hide", "unhide"]
# Two events of one page at the same revision and second: the later kind in this order is the later act
# (a page is edited, then moved, then its text hidden, then deleted, then restored).
_ORDER: dict[str, int] = {"edit": 0, "move": 1, "unhide": 2, "hide": 3, "delete": 4, "undelete": 5}


class StreamError(RagindexError):
    """EventStreams could not be read (unreachable, refused, or broke too often)."""


@dataclass(frozen=True)
class PageEvent:
    kind: Kind
    page_id: int
    rev_id: int
    title: str
    ns: int  # the page's namespace after the event
    dt: str  # meta.dt, ISO-8601 UTC


@dataclass
class StreamRead:
    events: list[PageEvent] = field(default_factory=list)  # the wiki's main-namespace events, no duplicates
    position: str | None = None  # the SSE id of the last event read (the next read resumes after it)
    newest_dt: str | None = None  # meta.dt of the newest event read (any wiki)
    seen: int = 0  # events read, all wikis
    other: int = 0  # other wikis, other namespaces
    duplicates: int = 0
    reconnects: int = 0


@dataclass(frozen=True)
class PageState:
    """Where a page ends after a window of events: `fetch` its text at `rev_id`, or `remove` it.

    `exact` (a hidden revision): remove only what serves exactly that revision, not a newer one."""

    action: Literal["fetch", "remove"]
    page_id: int
    rev_id: int
    title: str
    reason: str
    exact: bool = False


def stream_url(base: str, streams: Iterable[str] = STREAMS) -> str:
    return f"{base.rstrip('/')}/v2/stream/{','.join(streams)}"


def parse_dt(value: str) -> datetime:
    """meta.dt (`2020-07-01T00:00:00Z`, or with fractions and an offset) as an aware UTC datetime."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_dt(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_changes(base_url: str, wiki: str, *, user_agent: str, last_event_id: str | None = None,
                 since: datetime | None = None, until: datetime | None = None, idle_s: float = 5.0,
                 max_reconnects: int = 5, connect_timeout_s: float = 30.0) -> StreamRead:
    """Every event of `wiki`'s main namespace after `last_event_id` (else from `since`) up to `until`."""
    if last_event_id is None and since is None:
        raise Rejected("an EventStreams read needs a position (Last-Event-ID) or a start time (since)")
    read = StreamRead(position=last_event_id)
    seen_ids: set[str] = set()
    url = stream_url(base_url)
    failures = 0
    timeout = httpx.Timeout(connect_timeout_s, read=idle_s)
    with httpx.Client(headers={"User-Agent": user_agent}, timeout=timeout) as client:
        while True:
            headers = {"Last-Event-ID": read.position} if read.position else {}
            params = {} if read.position else {"since": format_dt(since)}  # type: ignore[arg-type]
            before = read.seen
            try:
                with connect_sse(client, "GET", url, params=params, headers=headers) as source:
                    if source.response.status_code != 200:
                        raise StreamError(f"EventStreams {url} answered HTTP {source.response.status_code}")
                    for sse in source.iter_sse():
                        if not sse.data or sse.event not in ("message", ""):
                            continue
                        if _take(read, sse.id, sse.data, wiki, until, seen_ids) is _STOP:
                            return read
            except httpx.ReadTimeout:
                return read  # quiet for idle_s: caught up with the stream
            except (httpx.TransportError, SSEError) as exc:
                failures = 0 if read.seen > before else failures + 1
                if failures > max_reconnects:
                    raise StreamError(f"EventStreams {url}: the connection failed {failures} times in a row "
                                      f"({type(exc).__name__}: {exc})") from None
                read.reconnects += 1
                time.sleep(min(0.2 * failures, 2.0))
                continue
            # The server closed the stream cleanly: reconnect from the last position, as EventSource does.
            failures = 0 if read.seen > before else failures + 1
            if failures > max_reconnects:
                return read
            read.reconnects += 1


_STOP = object()


def _take(read: StreamRead, sse_id: str, data: str, wiki: str, until: datetime | None,
          seen_ids: set[str]) -> object:
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise StreamError(f"EventStreams sent an event that is not JSON: {data[:80]!r}") from None
    meta = event.get("meta") or {}
    dt = meta.get("dt")
    if not isinstance(dt, str):
        raise StreamError(f"EventStreams event without meta.dt: {data[:80]!r}")
    if until is not None and parse_dt(dt) > until:
        return _STOP  # unread: the position stays on the previous event
    read.seen += 1
    if sse_id:
        read.position = sse_id
    if read.newest_dt is None or parse_dt(dt) > parse_dt(read.newest_dt):
        read.newest_dt = dt
    key = meta.get("id") or json.dumps([meta.get("stream"), event.get("page_id"), event.get("rev_id"), dt])
    if key in seen_ids:
        read.duplicates += 1
        return None
    seen_ids.add(key)
    page_event = _page_event(event, meta.get("stream", ""), wiki)
    if page_event is None:
        read.other += 1
    else:
        read.events.append(page_event)
    return None


def _page_event(event: dict[str, Any], stream: str, wiki: str) -> PageEvent | None:
    """The event as a main-namespace page event of `wiki`, or None (another wiki or namespace)."""
    if event.get("database") != wiki:
        return None
    ns = int(event["page_namespace"])
    kind: Kind
    if stream.endswith("revision-create"):
        kind = "edit"
    elif stream.endswith("page-delete"):
        kind = "delete"
    elif stream.endswith("page-undelete"):
        kind = "undelete"
    elif stream.endswith("page-move"):
        kind = "move"
        prior_ns = int((event.get("prior_state") or {}).get("page_namespace", ns))
        if ns != 0 and prior_ns != 0:
            return None
    elif stream.endswith("revision-visibility-change"):
        kind = "unhide" if (event.get("visibility") or {}).get("text", True) else "hide"
    else:
        return None
    if ns != 0 and kind != "move":
        return None
    return PageEvent(kind=kind, page_id=int(event["page_id"]), rev_id=int(event["rev_id"]),
                     title=str(event["page_title"]).replace("_", " "), ns=ns, dt=event["meta"]["dt"])


def final_states(events: Iterable[PageEvent]) -> dict[int, PageState]:
    """Each page's state after `events`, whatever order they arrived in: revision ids decide, then time.

    edit / undelete / unhide -> fetch that revision; a move into the main namespace -> fetch (the new
    title comes with the text); delete, a move out of the main namespace -> remove; hide -> remove that
    exact revision (what serves a newer one stays)."""
    by_page: dict[int, list[PageEvent]] = {}
    for event in events:
        by_page.setdefault(event.page_id, []).append(event)
    states: dict[int, PageState] = {}
    for page_id, page_events in by_page.items():
        last = max(page_events, key=lambda e: (e.rev_id, parse_dt(e.dt), _ORDER[e.kind]))
        if last.kind in ("delete",) or (last.kind == "move" and last.ns != 0):
            reason = "deleted" if last.kind == "delete" else "moved out of the main namespace"
            states[page_id] = PageState("remove", page_id, last.rev_id, last.title, reason)
        elif last.kind == "hide":
            states[page_id] = PageState("remove", page_id, last.rev_id, last.title, "text hidden", exact=True)
        else:
            states[page_id] = PageState("fetch", page_id, last.rev_id, last.title, last.kind)
    return states
