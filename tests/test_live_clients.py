"""The EventStreams and Action API clients against loopback servers that speak the real formats."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from tasks.action_api import ApiError, fetch_revisions
from tasks.eventstreams import final_states, read_changes
from tests.fixtures.eventstreams import event

UA = "ragindex-tests/1.0 (https://example.org; tests)"
SINCE = datetime(2024, 1, 2, tzinfo=UTC)


def _dt(minute: int, second: int = 0) -> str:
    return f"2024-01-02T00:{minute:02d}:{second:02d}Z"


def test_reads_the_wiki_main_namespace_from_since_and_resumes_with_last_event_id(eventstreams):
    es = eventstreams
    es.add(event("mediawiki.revision-create", "enwiki", 1, "Alpha", 101, _dt(1)))
    es.add(event("mediawiki.revision-create", "dewiki", 1, "Alpha", 555, _dt(1, 30)))  # another wiki
    es.add(event("mediawiki.revision-create", "enwiki", 2, "Talk:Beta", 201, _dt(2), ns=1))  # talk page
    dup = es.add(event("mediawiki.revision-create", "enwiki", 3, "Gamma", 301, _dt(3)), partition=1)
    es.duplicate(dup["meta"]["id"])
    es.add(event("mediawiki.revision-create", "enwiki", 1, "Alpha", 102, _dt(4)))
    first = read_changes(es.url, "enwiki", user_agent=UA, since=SINCE, idle_s=0.5)
    assert [(e.page_id, e.rev_id) for e in first.events] == [(1, 101), (3, 301), (1, 102)]
    assert first.duplicates == 1 and first.other == 2 and first.newest_dt == _dt(4)
    assert es.requests[0]["since"] == "2024-01-02T00:00:00Z" and es.requests[0]["last_event_id"] is None
    assert es.requests[0]["streams"] == ["mediawiki.revision-create", "mediawiki.page-delete", "mediawiki.page-move",
                                         "mediawiki.page-undelete", "mediawiki.revision-visibility-change"]
    assert es.requests[0]["user_agent"] == UA
    position = json.loads(first.position)
    assert {(a["topic"], a["partition"]) for a in position} == {("eqiad.mediawiki.revision-create", 0),
                                                                ("eqiad.mediawiki.revision-create", 1)}

    es.add(event("mediawiki.page-delete", "enwiki", 3, "Gamma", 301, _dt(5)))
    second = read_changes(es.url, "enwiki", user_agent=UA, last_event_id=first.position, idle_s=0.5)
    assert es.requests[-1]["last_event_id"] == first.position and es.requests[-1]["since"] is None
    # A timestamp position delivers the last event of each partition again; nothing earlier comes back.
    assert (3, "delete") in [(e.page_id, e.kind) for e in second.events]
    assert (1, 101) not in [(e.page_id, e.rev_id) for e in second.events]


def test_a_mid_stream_disconnect_reconnects_from_the_last_event(eventstreams):
    es = eventstreams
    for i in range(6):
        es.add(event("mediawiki.revision-create", "enwiki", 10 + i, f"P{i}", 1000 + i, _dt(1, i)))
    es.drop_after(3)
    read = read_changes(es.url, "enwiki", user_agent=UA, since=SINCE, idle_s=0.5)
    assert read.reconnects == 1 and len(es.requests) == 2
    assert es.requests[1]["last_event_id"] is not None
    assert sorted({e.rev_id for e in read.events}) == [1000 + i for i in range(6)]  # none lost


def test_stops_at_until_and_leaves_later_events_for_the_next_read(eventstreams):
    es = eventstreams
    es.add(event("mediawiki.revision-create", "enwiki", 1, "A", 11, _dt(1)))
    es.add(event("mediawiki.revision-create", "enwiki", 2, "B", 12, _dt(9)))
    started = time.monotonic()
    read = read_changes(es.url, "enwiki", user_agent=UA, since=SINCE, until=datetime(2024, 1, 2, 0, 5, tzinfo=UTC),
                        idle_s=30)
    assert time.monotonic() - started < 10  # stopped at the later event, did not wait to go idle
    assert [e.rev_id for e in read.events] == [11]
    after = read_changes(es.url, "enwiki", user_agent=UA, last_event_id=read.position, idle_s=0.5)
    assert 12 in [e.rev_id for e in after.events]


def test_final_states_revision_ids_decide_whatever_the_partition_order(eventstreams):
    es = eventstreams
    # Delivered out of order: the delete (partition 1) arrives before the edit it follows (partition 0).
    es.add(event("mediawiki.page-delete", "enwiki", 5, "Doomed", 52, _dt(3)), partition=1)
    es.add(event("mediawiki.revision-create", "enwiki", 5, "Doomed", 51, _dt(1)))
    es.add(event("mediawiki.revision-create", "enwiki", 5, "Doomed", 52, _dt(2)))
    # A move, then an edit under the new title.
    es.add(event("mediawiki.page-move", "enwiki", 6, "New name", 61, _dt(2),
                 prior_state={"page_title": "Old_name", "page_namespace": 0, "rev_id": 60}))
    # Moved out of the main namespace.
    es.add(event("mediawiki.page-move", "enwiki", 7, "Draft:Seven", 71, _dt(2), ns=118,
                 prior_state={"page_title": "Seven", "page_namespace": 0, "rev_id": 70}))
    # Hidden text of the page's newest revision; and an older revision hidden on a page edited since.
    es.add(event("mediawiki.revision-visibility-change", "enwiki", 8, "Secret", 81, _dt(4),
                 visibility={"text": False, "user": True}, prior_state={"visibility": {"text": True, "user": True}}))
    es.add(event("mediawiki.revision-create", "enwiki", 9, "Nine", 92, _dt(2)))
    es.add(event("mediawiki.revision-visibility-change", "enwiki", 9, "Nine", 91, _dt(4),
                 visibility={"text": False, "user": True}, prior_state={"visibility": {"text": True, "user": True}}))
    # Deleted, then restored.
    es.add(event("mediawiki.page-delete", "enwiki", 10, "Back", 100, _dt(1)))
    es.add(event("mediawiki.page-undelete", "enwiki", 10, "Back", 100, _dt(2), prior_state={"page_id": 10}))
    read = read_changes(es.url, "enwiki", user_agent=UA, since=SINCE, idle_s=0.5)
    states = final_states(read.events)
    assert (states[5].action, states[5].reason) == ("remove", "deleted")
    assert (states[6].action, states[6].rev_id) == ("fetch", 61)
    assert states[7].action == "remove"
    assert (states[8].action, states[8].exact) == ("remove", True)
    assert (states[9].action, states[9].rev_id) == ("fetch", 92)
    assert (states[10].action, states[10].rev_id) == ("fetch", 100)
    # The same events in another order end in the same states.
    assert final_states(reversed(read.events)) == states


def test_fetches_in_batches_of_50_with_user_agent_and_maxlag(action_api):
    for rev in range(1, 121):
        action_api.add(rev, page_id=rev + 1000, title=f"Page {rev}", text=f"text {rev}")
    action_api.hide(7)
    action_api.delete(8)
    got = fetch_revisions(action_api.url, [*range(1, 121), 999], user_agent=UA)
    assert [len(r["params"]["revids"].split("|")) for r in action_api.requests] == [50, 50, 21]
    assert all(r["user_agent"] == UA and r["params"]["maxlag"] == "5" for r in action_api.requests)
    assert got[1].text == "text 1" and got[1].title == "Page 1" and got[1].page_id == 1001
    assert got[7] is None and got[8] is None and got[999] is None  # hidden, deleted, never existed


def test_honours_retry_after_on_429_and_maxlag(action_api):
    action_api.add(1, page_id=10, title="A", text="a")
    action_api.throttle_next(1)
    action_api.lag_next(1)
    started = time.monotonic()
    got = fetch_revisions(action_api.url, [1], user_agent=UA)
    assert got[1].text == "a" and len(action_api.requests) == 3
    assert time.monotonic() - started >= 1.9  # waited Retry-After (1 s) twice


def test_gives_up_in_one_line_when_the_api_keeps_refusing(action_api):
    action_api.add(1, page_id=10, title="A", text="a")
    action_api.throttle_next(10)
    with pytest.raises(ApiError, match="still refusing after 3 attempts"):
        fetch_revisions(action_api.url, [1], user_agent=UA, retries=2, max_wait_s=0.1)
