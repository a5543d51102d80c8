"""Validation of names that come from outside before they are joined onto any path."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from storage.errors import InvalidName

_VERSION_RE = re.compile(r"[a-z0-9._-]{1,200}")
_FILE_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
_WIKI_RE = re.compile(r"[a-z][a-z0-9_]{1,40}")
_DATE_RE = re.compile(r"\d{8}")


def _is_dots(name: str) -> bool:
    # `.` names the directory itself and `..` its parent: neither may be a version or a file.
    return name == "." or ".." in name


def check_version_id(version_id: str) -> str:
    """Return `version_id` if it is a safe version id, else raise InvalidName."""
    if not isinstance(version_id, str) or not _VERSION_RE.fullmatch(version_id) or _is_dots(version_id):
        raise InvalidName(f"invalid version id {version_id!r}: only [a-z0-9._-] allowed, no '..'")
    return version_id


def check_file_name(name: str) -> str:
    """Return `name` if it is a plain file name (no '/', no '..', only [A-Za-z0-9._-])."""
    if not isinstance(name, str) or not _FILE_RE.fullmatch(name) or _is_dots(name):
        raise InvalidName(f"refusing file name {name!r}: only [A-Za-z0-9._-] allowed, no '/' or '..'")
    return name


def check_wiki(wiki: str) -> str:
    """Return `wiki` if it looks like a dump database name such as `enwiki`."""
    if not isinstance(wiki, str) or not _WIKI_RE.fullmatch(wiki):
        raise InvalidName(f"invalid wiki name {wiki!r}: expected something like 'enwiki'")
    return wiki


def check_dump_date(date: str) -> str:
    """Return `date` if it is `YYYYMMDD` (resolve `latest` before calling this)."""
    if not isinstance(date, str) or not _DATE_RE.fullmatch(date):
        raise InvalidName(f"invalid dump date {date!r}: expected YYYYMMDD or 'latest'")
    return date


def new_version_id(wiki: str, dump_date: str, now: datetime | None = None) -> str:
    """`<wiki>-<dump_date>-<UTC yyyymmddThhmmssZ>`, lower-cased to fit the id alphabet."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ").lower()
    return check_version_id(f"{wiki.lower()}-{dump_date.lower()}-{stamp}")
