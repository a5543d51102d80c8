"""Find a wiki's finished adds-changes ("incr") days on a mirror and fetch them into the store, verified.

Beside the full runs (`<mirror>/<wiki>/<date>/`), Wikimedia publishes one small run a day under
`<mirror>/other/incr/<wiki>/<YYYYMMDD>/` (an HTML directory listing names the days):

- `status.txt`: `done:all` once the day is complete; anything else, or no file, means not yet;
- `maxrevid.txt`: the highest revision id the day's window covers, one integer;
- `<wiki>-<date>-pages-meta-hist-incr.xml.bz2`: the window's new revisions, with text (what we use);
- `<wiki>-<date>-md5sums.txt`: `<md5> *<file>` lines (or `<md5>  <file>`), the only digests published.

A date absent from the listing is skipped (the next day's window covers the gap); the first listed
day that is not finished ends the chain, since applying a later day over the hole would lose edits.
Requests go through `tasks.mirror_http`, downloads through `tasks.download.fetch_verified`: resumed,
retried, renamed into `downloads/<wiki>/<date>/` only once the md5 matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from storage import names
from storage.errors import NotFound, Rejected
from storage.store import IndexStore
from tasks.download import RemoteFile, fetch_verified
from tasks.mirror_http import MirrorHttp, listed_dates

DONE = "done:all"
_MD5_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](\S+)")


@dataclass(frozen=True)
class IncrDay:
    wiki: str
    date: str  # YYYYMMDD
    maxrevid: int
    location: str  # URL of the day directory
    file: RemoteFile  # the pages-meta-hist-incr.xml.bz2; md5 from md5sums.txt, size None unless known


@dataclass
class IncrChain:
    days: list[IncrDay]  # finished days after `after`, ascending, up to the first unfinished one
    stopped_at: str | None  # date of the first day that is not done:all (None if none)
    stop_reason: str | None  # one line
    listed: int  # day directories listed after `after` (and up to `until`)


def incr_root(mirror: str, wiki: str) -> str:
    return f"{mirror.rstrip('/')}/other/incr/{names.check_wiki(wiki)}"


def pages_file_name(wiki: str, date: str) -> str:
    return f"{wiki}-{date}-pages-meta-hist-incr.xml.bz2"


def pending_days(mirror: str, wiki: str, after: str | None, user_agent: str, *, retries: int = 5,
                 backoff_s: float = 1.0, timeout_s: float = 30.0, until: str | None = None) -> IncrChain:
    """The finished days in (`after`, `until`], in date order, up to the first unfinished one."""
    root = incr_root(mirror, wiki)
    for bound in (after, until):
        if bound is not None:
            names.check_dump_date(bound)
    with MirrorHttp(user_agent, retries, backoff_s, timeout_s=timeout_s, host=httpx.URL(root).host) as http:
        listing = http.get(f"{root}/")
        if listing is None:
            raise NotFound(f"no adds-changes (incr) directory for {wiki} on the mirror: {root}/ not found")
        dates = sorted(d for d in listed_dates(listing)
                       if (after is None or d > after) and (until is None or d <= until))
        days: list[IncrDay] = []
        for date in dates:
            unfinished = _unfinished(http, f"{root}/{date}")
            if unfinished:
                return IncrChain(days, stopped_at=date, stop_reason=f"{date} is not finished ({unfinished})",
                                 listed=len(dates))
            days.append(_day(http, root, wiki, date))
        # maxrevids should rise day by day; one that does not is kept in date order all the same:
        # overlapping windows only repeat revisions, which applying a day tolerates.
        return IncrChain(days, stopped_at=None, stop_reason=None, listed=len(dates))


def _unfinished(http: MirrorHttp, location: str) -> str | None:
    """Why the day is not finished (None when its status.txt says done:all)."""
    response = http.get(f"{location}/status.txt")
    if response is None:
        return "no status.txt"
    status = response.text.strip()
    return None if status == DONE else f"status.txt: {status[:60]!r}"


def _day(http: MirrorHttp, root: str, wiki: str, date: str) -> IncrDay:
    location = f"{root}/{date}"
    name = pages_file_name(wiki, date)
    names.check_file_name(name)
    return IncrDay(wiki=wiki, date=date, maxrevid=_maxrevid(http, location), location=location,
                   file=RemoteFile(name=name, url=f"{location}/{name}", md5=_md5_of(http, location, wiki, date, name)))


def _maxrevid(http: MirrorHttp, location: str) -> int:
    url = f"{location}/maxrevid.txt"
    response = http.get(url)
    if response is None:
        raise Rejected(f"{url} not found: a finished adds-changes day must publish its maxrevid")
    text = response.text.strip()
    if not re.fullmatch(r"\d{1,18}", text):
        raise Rejected(f"{url}: malformed maxrevid {text[:40]!r}: expected one integer")
    return int(text)


def _md5_of(http: MirrorHttp, location: str, wiki: str, date: str, name: str) -> str:
    url = f"{location}/{wiki}-{date}-md5sums.txt"
    response = http.get(url)
    if response is None:
        raise Rejected(f"{url} not found: {name} could not be verified")
    found = {m.group(1).lower() for line in response.text.splitlines()
             if (m := _MD5_LINE.fullmatch(line.strip())) and m.group(2) == name}
    if not found:
        raise Rejected(f"{url} has no md5 line for {name}")
    if len(found) > 1:
        raise Rejected(f"{url} lists {len(found)} different md5s for {name}")
    return found.pop()


class PartialDay(Rejected):
    """A day marked `done:all` whose pages file holds fewer revisions than its `maxrevid` says it covers."""


def check_days_complete(days: Sequence[IncrDay], highest: Sequence[int]) -> None:
    """`PartialDay` unless each day's pages file reaches the `maxrevid` the day published (`highest`: the
    highest revision id each file holds, in the same order).

    Applied as complete, a partial day would lose the edits it is missing for good: the next night starts
    after it. So the night fails, naming the day, and applies nothing; the days before it are not applied
    alone either, and the next night tries again (a republished day has a new md5 and is fetched again)."""
    for day, top in zip(days, highest, strict=True):
        if top < day.maxrevid:
            raise PartialDay(f"adds-changes day {day.date} is marked {DONE} but its {day.file.name} holds revisions "
                             f"only up to {top}, short of its maxrevid {day.maxrevid}: a partial file, not applied")


def download_day(day: IncrDay, store: IndexStore, user_agent: str, *, retries: int = 5, backoff_s: float = 1.0,
                 progress: bool = True) -> str:
    """Fetch the day's pages file into `downloads/<wiki>/<date>/`; the URL of the md5-verified copy."""
    names.check_wiki(day.wiki)
    names.check_dump_date(day.date)
    if not day.file.md5:
        # pending_days always finds one; an IncrDay built elsewhere must not slip through unverified.
        raise Rejected(f"no md5 known for {day.file.name}: an adds-changes day is never downloaded unverified")
    with MirrorHttp(user_agent, retries, backoff_s, timeout_s=60.0, host=httpx.URL(day.location).host) as http:
        return fetch_verified(http, day.file, store, day.wiki, day.date, progress)
