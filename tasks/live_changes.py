"""What a live run applies: the streams' events since the lineage's position, reduced to each page's final
state, with the texts fetched, as the `Revisions` the delta path takes (`tasks.delta_version.apply_revisions`).

Where a run starts: the serving lineage's `StreamPosition` (the SSE id of the last event a version applied,
sent back as `Last-Event-ID`); a lineage without one (a full build, or nightly deltas only) starts at
its own time, the dump's date or its newest applied day, with `since=`, so nothing between the dump
and the first live run is lost. That time must lie within the streams' retention (`RETENTION`);
otherwise `BeyondRetention`, and the run falls back to the adds-changes days.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from storage.errors import Rejected
from storage.manifest import Lineage, StreamPosition
from tasks.action_api import fetch_revisions
from tasks.delta_passages import Removal, Revisions
from tasks.eventstreams import RETENTION, StreamRead, final_states, format_dt, read_changes
from tasks.parse import Page

_REDIRECT = ("#redirect",)  # the English magic word: enwiki's redirects (and every wiki's that keeps it)


class BeyondRetention(Rejected):
    """The lineage's time is older than the streams keep: the live path cannot see all that came after it."""


@dataclass
class LiveWindow:
    revisions: Revisions
    read: StreamRead
    start: str  # "after <position>" or "since <time>", for the run's report
    position: StreamPosition | None  # what the version made from this window has applied
    fetched: int = 0
    gone: list[int] = field(default_factory=list)  # revisions deleted or hidden by the time they were fetched


def lineage_time(lineage: Lineage) -> datetime:
    """The time a lineage's knowledge reaches without a stream position: its newest day (or its dump's date)."""
    return datetime.strptime(lineage.watermark, "%Y%m%d").replace(tzinfo=UTC)


def read_window(lineage: Lineage, wiki: str, *, streams_url: str, api_url: str, user_agent: str,
                now: datetime | None = None, idle_s: float = 5.0) -> LiveWindow:
    """The events after the lineage's position (or since its time) up to `now`, and the texts they name."""
    now = now or datetime.now(UTC)
    held = lineage.stream
    if held is not None:
        read = read_changes(streams_url, wiki, user_agent=user_agent, last_event_id=held.last_event_id, until=now,
                            idle_s=idle_s)
        start = f"after the stream position of {held.newest_event}"
    else:
        since = lineage_time(lineage)
        if now - since > RETENTION:
            raise BeyondRetention(f"the lineage's time {format_dt(since)} ({lineage.describe()}) is older than the "
                                  f"streams keep ({RETENTION.days} days): falling back to the adds-changes days")
        read = read_changes(streams_url, wiki, user_agent=user_agent, since=since, until=now, idle_s=idle_s)
        start = f"since {format_dt(since)}"
    position = StreamPosition(last_event_id=read.position, newest_event=read.newest_dt or now.isoformat()) \
        if read.position else held
    states = final_states(read.events)
    revisions = Revisions(pages={}, revisions_seen=read.seen)
    for page_id, state in states.items():
        if state.action == "remove":
            revisions.removed[page_id] = Removal(state.rev_id, state.reason, exact=state.exact)
    wanted = {state.rev_id: state for state in states.values() if state.action == "fetch"}
    texts = fetch_revisions(api_url, wanted, user_agent=user_agent) if wanted else {}
    window = LiveWindow(revisions=revisions, read=read, start=start, position=position, fetched=len(wanted))
    for rev_id, state in sorted(wanted.items()):
        revision = texts.get(rev_id)
        if revision is None:
            window.gone.append(rev_id)
            revisions.removed[state.page_id] = Removal(rev_id, "revision deleted or hidden")
            continue
        redirect = revision.text.lstrip().lower().startswith(_REDIRECT)
        revisions.pages[revision.page_id] = Page(revision.page_id, revision.rev_id, revision.title, revision.ns,
                                                 redirect, revision.model, revision.text)
    return window
