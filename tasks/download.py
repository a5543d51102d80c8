"""Find a Wikipedia dump and fetch it into the store, verified.

A dump is located either on a mirror laid out like dumps.wikimedia.org (`<mirror>/<wiki>/<date>/`
with `dumpstatus.json`) or at a local / `file://` / `s3://` path (`resolve_source`). Either way the
result is a `DumpRef`: where it came from and which files, with their sha1 and size when known.

Mirror downloads stream to a temp name beside the target, resume with an HTTP Range request,
retry with backoff, and are renamed into place only once their sha1 (md5 for the daily adds-changes
files of `tasks.incr_dumps`) matches, so a file under its
final name in `downloads/<wiki>/<date>/` is always complete and verified, and kept only while it
still matches what the mirror publishes (a republished file is fetched again). Network trouble is retried
here (backoff, resumed transfers) and only here: the flow's Prefect tasks do not retry on top.

Locating a dump (mirror or local/S3 layout) and fetching it share the mirror's layout and `DumpRef`;
the HTTP client is `tasks.mirror_http`, shared with `tasks.incr_dumps`.
"""

from __future__ import annotations

import bz2
import logging
import os
import re
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from typing import BinaryIO

import httpx
from tqdm import tqdm

from storage import names
from storage.errors import InvalidName, NotFound, Rejected
from storage.fs import file_digest, is_local, join, load_json, resolve, to_url
from storage.manifest import DumpFile, SourceDump
from storage.scratch import private_dir, scratch_root
from storage.store import IndexStore
from tasks.mirror_http import DownloadError, MirrorHttp, listed_dates
from tasks.parse import decoded_head, index_name_for

JOBS = ("articlesmultistreamdump", "articlesdump")
DUMPSTATUS = "dumpstatus.json"
log = logging.getLogger(__name__)
# Local dump files whose name carries no date and that hold no revision to date them by get this one:
# valid for `check_dump_date`, sorts before every real dump, and says plainly "date unknown".
UNDATED = "00000000"
SCRATCH_DAYS = 7  # a partial S3-bound download left this long by a killed run is not resumed but removed
_DUMP_NAME = re.compile(r"^([a-z][a-z0-9_]*?wik[a-z]*)-(\d{8}|latest)-")
_DATA_NAME = re.compile(r"-pages-(?:articles|meta-current|meta-history)[^/]*\.xml(?:[^/]*\.bz2)?$")
@dataclass
class RemoteFile:
    name: str
    url: str
    sha1: str | None = None
    size: int | None = None
    md5: str | None = None  # what adds-changes days publish instead of sha1 (md5sums.txt)


@dataclass
class DumpRef:
    """A located dump: small and picklable, handed between tasks."""

    wiki: str
    dump_date: str
    location: str  # mirror run URL, directory, file:// or s3:// it came from
    files: list[RemoteFile] = field(default_factory=list)

    def source(self) -> SourceDump:
        return SourceDump(wiki=self.wiki, dump_date=self.dump_date, location=self.location,
                          files=[DumpFile(name=f.name, sha1=f.sha1, size=f.size) for f in self.files])

    @property
    def remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


def _part_key(name: str) -> tuple:
    """Order part files naturally (multistream2 before multistream10), index files after data."""
    return (is_index_name(name), [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def is_index_name(name: str) -> bool:
    return "-index" in name and ".txt" in name


# --- dumpstatus.json ------------------------------------------------------------------------------

def files_from_status(status: dict, job: str, where: str) -> list[tuple[str, str | None, int | None]]:
    """[(name, sha1, size)] of a finished job, names checked before they can touch a path."""
    if job not in JOBS:
        raise InvalidName(f"unknown dump job {job!r}: expected one of {', '.join(JOBS)}")
    jobs = status.get("jobs") if isinstance(status, dict) else None
    if not isinstance(jobs, dict) or job not in jobs:
        raise NotFound(f"{where}: no job {job!r} in {DUMPSTATUS}")
    info = jobs[job]
    if info.get("status") != "done":
        raise Rejected(f"{where}: job {job} is {info.get('status')!r}, not 'done'")
    files = info.get("files") or {}
    if not files:
        raise NotFound(f"{where}: job {job} lists no files")
    out = []
    for name, meta in files.items():
        names.check_file_name(name)
        meta = meta or {}
        size = meta.get("size")
        out.append((name, meta.get("sha1"), int(size) if size is not None else None))
    return sorted(out, key=lambda f: _part_key(f[0]))


def _job_done(status: dict, job: str) -> bool:
    try:
        return status["jobs"][job]["status"] == "done"
    except (KeyError, TypeError):
        return False


# --- mirror ---------------------------------------------------------------------------------------

def resolve_dump(wiki: str, date: str, mirror: str, user_agent: str,
                 job: str = "articlesmultistreamdump", retries: int = 3, backoff_s: float = 1.0) -> DumpRef:
    """Locate `<mirror>/<wiki>/<date>/`; `latest` = the newest dated run whose `job` is done.

    The `latest/` directory is never used: during a run it can mix files of two dumps.
    """
    names.check_wiki(wiki)
    if job not in JOBS:
        raise InvalidName(f"unknown dump job {job!r}: expected one of {', '.join(JOBS)}")
    mirror = mirror.rstrip("/")
    with MirrorHttp(user_agent, retries, backoff_s, host=httpx.URL(mirror).host) as http:
        if date == "latest":
            listing = http.get(f"{mirror}/{wiki}/")
            if listing is None:
                raise NotFound(f"no wiki {wiki!r} on {mirror}")
            dates = sorted(listed_dates(listing), reverse=True)
            for candidate in dates:
                status = _status(http, mirror, wiki, candidate)
                if status is not None and _job_done(status, job):
                    return _mirror_ref(mirror, wiki, candidate, status, job)
            raise NotFound(f"no finished {job} run for {wiki} on {mirror} (looked at {len(dates)} dated runs)")
        names.check_dump_date(date)
        status = _status(http, mirror, wiki, date)
        if status is None:
            raise NotFound(f"no dump {wiki} {date} on {mirror}")
        return _mirror_ref(mirror, wiki, date, status, job)


def _status(http: MirrorHttp, mirror: str, wiki: str, date: str) -> dict | None:
    url = f"{mirror}/{wiki}/{date}/{DUMPSTATUS}"
    response = http.get(url)
    if response is None:
        return None
    try:
        return response.json()
    except ValueError:
        raise Rejected(f"{url} is not valid JSON") from None


def _mirror_ref(mirror: str, wiki: str, date: str, status: dict, job: str) -> DumpRef:
    run = f"{mirror}/{wiki}/{date}"
    files = files_from_status(status, job, f"{wiki} {date}")
    # URLs are built from the checked name, not taken from the status file: it cannot point elsewhere.
    return DumpRef(wiki=wiki, dump_date=date, location=run,
                   files=[RemoteFile(name, f"{run}/{name}", sha1, size) for name, sha1, size in files])


# --- local / s3 sources ---------------------------------------------------------------------------

def resolve_source(source: str, s3_endpoint_url: str | None = None,
                   job: str = "articlesmultistreamdump", wiki: str | None = None, date: str | None = None) -> DumpRef:
    """A dump file, a mirror-like run dir (`dumpstatus.json`), or `<dir>/<wiki>/<date>/`; read in place.

    wiki and date come from `dumpstatus.json` or the file names; a file without a wiki in its name gets
    the `<dbname>` of its siteinfo, or else `wiki` (what the user named with --wiki; it must agree with
    the others). A file without a date in its name (`enwiki-latest-...`) is dated `date` (--date), or
    else by its newest revision (`newest_revision_date`: the siteinfo holds no date), or UNDATED when it
    holds no revision.
    """
    if wiki is not None:
        names.check_wiki(wiki)
    if date is not None:
        names.check_dump_date(date)
    fs, path = resolve(source, s3_endpoint_url)
    if not fs.exists(path):
        raise NotFound(f"dump source not found: {source}")
    if not fs.isdir(path):
        return _file_ref(fs, path, source, wiki, date)
    entries = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(path, detail=False)}
    if DUMPSTATUS in entries:
        return _run_dir_ref(fs, path, job, wiki)
    runs = _mirror_runs(fs, path, entries, job)
    if runs:
        return _run_dir_ref(fs, runs[0], job, wiki)
    data = sorted((n for n in entries if _DATA_NAME.search(n) and not is_index_name(n)), key=_part_key)
    if not data:
        raise NotFound(f"no dump files (*-pages-articles*.xml[.bz2]) or {DUMPSTATUS} in {source}")
    wiki, named = _wiki_date(fs, entries[data[0]], data[0], wiki)
    date = _dated(fs, [entries[n] for n in data], named, date, source)
    files = []
    for name in data:
        files.append(_local_file(fs, entries[name], name))
        index = index_name_for(name)
        if index in entries:
            files.append(_local_file(fs, entries[index], index))
    return DumpRef(wiki=wiki, dump_date=date, location=to_url(fs, path), files=files)


def _mirror_runs(fs, path: str, entries: dict[str, str], job: str) -> list[str]:
    """Dated run dirs under `<dir>/<wiki>/` (or `<dir>/` itself being a wiki dir), newest first."""
    candidates = []
    wiki_dirs = [entries[n] for n in entries if re.fullmatch(r"[a-z][a-z0-9_]*wik[a-z]*", n)]
    for wiki_dir in wiki_dirs or [path]:
        if not fs.isdir(wiki_dir):
            continue
        for run in fs.ls(wiki_dir, detail=False):
            name = run.rstrip("/").rsplit("/", 1)[-1]
            status_path = join(run, DUMPSTATUS)
            if re.fullmatch(r"\d{8}", name) and fs.exists(status_path) and _job_done(load_json(fs, status_path),
                                                                                    job):
                candidates.append((name, run))
    if len({run.rstrip("/").rsplit("/", 2)[-2] for _, run in candidates}) > 1:
        found = sorted({run.rstrip("/").rsplit("/", 2)[-2] for _, run in candidates})
        raise Rejected(f"{to_url(fs, path)} holds several wikis ({', '.join(found)}): point at one")
    return [run for _, run in sorted(candidates, reverse=True)]


def _run_dir_ref(fs, run: str, job: str, given_wiki: str | None = None) -> DumpRef:
    status = load_json(fs, join(run, DUMPSTATUS))
    parts = run.rstrip("/").rsplit("/", 2)
    date = parts[-1]
    files = files_from_status(status, job, to_url(fs, run))
    wiki, name_date = _wiki_date(fs, join(run, files[0][0]), files[0][0], given_wiki)
    if not re.fullmatch(r"\d{8}", date):
        date = name_date
    if len(parts) >= 2 and re.fullmatch(r"[a-z][a-z0-9_]*wik[a-z]*", parts[-2]):
        wiki = _agree(parts[-2], given_wiki, to_url(fs, run))
    out = []
    for name, sha1, size in files:
        fpath = join(run, name)
        if not fs.exists(fpath):
            raise NotFound(f"{to_url(fs, run)}: {DUMPSTATUS} lists {name}, which is missing")
        out.append(RemoteFile(name, to_url(fs, fpath), sha1, size))
    return DumpRef(wiki=names.check_wiki(wiki), dump_date=names.check_dump_date(date),
                   location=to_url(fs, run), files=out)


def _file_ref(fs, path: str, source: str, given_wiki: str | None = None, given_date: str | None = None) -> DumpRef:
    name = path.rsplit("/", 1)[-1]
    wiki, named = _wiki_date(fs, path, name, given_wiki)
    date = _dated(fs, [path], named, given_date, source)
    files = [_local_file(fs, path, name)]
    index_path = join(path.rsplit("/", 1)[0], index_name_for(name))
    if index_path != path and fs.exists(index_path):
        files.append(_local_file(fs, index_path, index_path.rsplit("/", 1)[-1]))
    return DumpRef(wiki=wiki, dump_date=date, location=to_url(fs, path), files=files)


def _local_file(fs, path: str, name: str) -> RemoteFile:
    return RemoteFile(name=name, url=to_url(fs, path), sha1=None, size=fs.size(path))


def _wiki_date(fs, path: str | None, name: str, given_wiki: str | None = None) -> tuple[str, str]:
    m = _DUMP_NAME.match(name)
    if m:
        date = m.group(2) if m.group(2) != "latest" else UNDATED
        return names.check_wiki(_agree(m.group(1), given_wiki, name)), date
    wiki = _dbname(fs, path) if path else None
    if wiki:
        return names.check_wiki(_agree(wiki, given_wiki, name)), UNDATED
    if given_wiki:
        return names.check_wiki(given_wiki), UNDATED
    raise Rejected(f"cannot tell which wiki {name} is from: its name does not start with "
                   f"'<wiki>-<YYYYMMDD>-' and it has no <dbname> in its siteinfo; name it with --wiki")


def _dated(fs, paths: list[str], named: str, given: str | None, source: str) -> str:
    """The dump date of local files whose names gave `named`: the name's date (which `given` must agree
    with), else `given`, else the newest revision they hold: the knowledge they carry, which is what
    "never older" compares (a dump's siteinfo has no date)."""
    if named != UNDATED:
        if given is not None and given != named:
            raise Rejected(f"{source} is the dump of {named}, not of --date {given}")
        return named
    if given is not None:
        return given
    newest = max((newest_revision_date(fs, p) for p in paths), default=None) or UNDATED
    log.info("%s has no date in its name: dated %s by its newest revision (name it with --date)", source, newest)
    return newest


_TIMESTAMP = re.compile(rb"<timestamp>(\d{4})-(\d\d)-(\d\d)T")


def newest_revision_date(fs, path: str) -> str | None:
    """YYYYMMDD of the newest `<timestamp>` in a dump file (bz2 or plain XML); None when it holds none.
    Reads the whole file (about 10 MB/s of bz2 on one core), with progress."""
    newest = b""
    tail = b""
    with ExitStack() as stack:
        raw = stack.enter_context(fs.open(path, "rb"))
        stream = stack.enter_context(bz2.open(raw)) if path.endswith(".bz2") else raw
        bar = stack.enter_context(tqdm(total=fs.size(path), unit="B", unit_scale=True, leave=False,
                                       desc=f"dating {path.rsplit('/', 1)[-1]}", disable=None))
        while chunk := stream.read(4 << 20):
            window = tail + chunk
            for m in _TIMESTAMP.finditer(window):
                newest = max(newest, m.group(1) + m.group(2) + m.group(3))
            tail = window[-32:]  # a timestamp cut by the chunk boundary is found whole in the next window
            bar.update(raw.tell() - bar.n)
    return newest.decode() if newest else None


def _agree(found: str, given: str | None, where: str) -> str:
    if given is not None and given != found:
        raise Rejected(f"{where} is a dump of {found}, not of --wiki {given}")
    return found


def _dbname(fs, path: str) -> str | None:
    """The `<dbname>` from the first 64 KiB of the dump's siteinfo (None when unreadable)."""
    try:
        with fs.open(path, "rb") as raw:
            if path.endswith(".bz2"):
                with bz2.open(raw) as stream:
                    head = stream.read(64 << 10)
            else:
                head = raw.read(64 << 10)
    except (OSError, EOFError):
        return None
    m = re.search(r"<dbname>([a-z][a-z0-9_]*)</dbname>", decoded_head(head))
    return m.group(1) if m else None


# --- download -------------------------------------------------------------------------------------

def download_dump(ref: DumpRef, store: IndexStore, user_agent: str, retries: int = 5, progress: bool = True,
                  backoff_s: float = 1.0, s3_endpoint_url: str | None = None,
                  allow_unverified: bool = False) -> list[str]:
    """Fetch a mirror dump into `store.downloads_path(wiki, date)`; URLs of the verified files, in order.

    A `DumpRef` from `resolve_source` is read in place: its files are verified (sha1 when known)
    and their URLs returned without copying. A mirror file whose size and sha1 are both unknown
    cannot be checked at all and is refused unless `allow_unverified`.
    """
    if not ref.remote:
        return [verify_in_place(f, s3_endpoint_url or store.s3_endpoint_url, progress) for f in ref.files]
    names.check_wiki(ref.wiki)
    names.check_dump_date(ref.dump_date)
    unverifiable = [f.name for f in ref.files if _expected_digest(f) is None and f.size is None]
    if unverifiable and not allow_unverified:
        raise Rejected(f"the mirror publishes neither size nor sha1 for {', '.join(unverifiable)}: nothing could "
                       "be verified; pass --allow-unverified (allow_unverified=true) to download it anyway")
    with MirrorHttp(user_agent, retries, backoff_s, timeout_s=60.0, host=httpx.URL(ref.location).host) as http:
        return [fetch_verified(http, f, store, ref.wiki, ref.dump_date, progress) for f in ref.files]


def verify_in_place(f: RemoteFile, s3_endpoint_url: str | None, progress: bool) -> str:
    fs, path = resolve(f.url, s3_endpoint_url)
    if not fs.exists(path):
        raise NotFound(f"dump file not found: {f.url}")
    if f.size is not None and fs.size(path) != f.size:
        raise Rejected(f"size mismatch for {f.name}: expected {f.size} bytes, found {fs.size(path)}")
    if f.sha1:
        digest = sha1_of(f.url, s3_endpoint_url, progress=progress)
        if digest != f.sha1.lower():
            raise Rejected(f"sha1 mismatch for {f.name}: expected {f.sha1}, got {digest}")
    return f.url


def sha1_of(url: str, s3_endpoint_url: str | None = None, progress: bool = False) -> str:
    """sha1 of a local or S3 file, streamed: the identity of a dump file the mirror did not hash."""
    fs, path = resolve(url, s3_endpoint_url)
    with _bar(path.rsplit("/", 1)[-1], fs.size(path), progress) as bar:
        return file_digest(fs, path, "sha1", on_block=bar.update)


def _bar(name: str, total: int | None, progress: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=None if progress else True, leave=False)


def _expected_digest(f: RemoteFile) -> tuple[str, str] | None:
    """(algorithm, hex) the mirror published for `f`: sha1 (full dumps) before md5 (adds-changes days)."""
    if f.sha1:
        return "sha1", f.sha1
    if f.md5:
        return "md5", f.md5
    return None


def fetch_verified(http: MirrorHttp, f: RemoteFile, store: IndexStore, wiki: str, date: str, progress: bool) -> str:
    """Download `f` into `downloads/<wiki>/<date>/`, renamed to its final name only once verified.

    A file already there is kept only while it matches what the mirror publishes now: a day or a dump
    republished with a new checksum (a truncated file that matched its old md5, say) is fetched again."""
    names.check_file_name(f.name)
    final = store.downloads_path(wiki, date, f.name)
    if store.fs.exists(final) and _still_published(store, final, f):
        return to_url(store.fs, final)
    if is_local(store.fs):
        partial = store.downloads_path(wiki, date, f".{f.name}.part")
        os.makedirs(os.path.dirname(partial), exist_ok=True)
    else:  # S3 cannot append: resume locally, upload once verified
        partial = os.path.join(resume_scratch(wiki, date), f".{f.name}.part")

    expected = _expected_digest(f)
    for fresh_start in (False, True):
        if fresh_start and os.path.lexists(partial):
            os.remove(partial)
        resumed = _transfer(http, f, partial, progress)
        if expected is None:
            break
        algorithm, want = expected
        digest = file_digest(*resolve(partial), algorithm)
        if digest == want.lower():
            break
        if fresh_start or not resumed:
            os.remove(partial)
            raise Rejected(f"{algorithm} mismatch for {f.name} from {f.url}: expected {want}, got {digest}")
        # A resumed file can be spoiled by a stale prefix; one clean download decides.
    if is_local(store.fs):
        os.replace(partial, final)
    else:
        store.fs.put_file(partial, final)
        os.remove(partial)
    return to_url(store.fs, final)


def _still_published(store: IndexStore, final: str, f: RemoteFile) -> bool:
    """Whether the stored download is the file the mirror publishes now: its size and, when the mirror
    publishes one, its checksum. The stored file is hashed again (the read a parse makes anyway): a
    present file proves only that it matched what was published when it was fetched."""
    if f.size is not None and store.fs.size(final) != f.size:
        log.warning("%s: the mirror now publishes %d bytes: fetching it again", f.name, f.size)
        return False
    expected = _expected_digest(f)
    if expected is None:
        return True
    algorithm, want = expected
    if file_digest(store.fs, final, algorithm) == want.lower():
        return True
    log.warning("%s: the mirror now publishes %s %s, which the stored copy does not match: fetching it again",
                f.name, algorithm, want)
    return False


def resume_scratch(wiki: str, date: str) -> str:
    """Where an S3-bound download resumes: `<tmp>/ragindex-<uid>/downloads/<wiki>/<date>/`.

    Per user and private (0700, ours, not a symlink: refused otherwise), so no other local user can plant a
    file or a symlink the worker would write through. Partial files not touched for `SCRATCH_DAYS` are
    removed by the next download; a finished one is removed once uploaded."""
    names.check_wiki(wiki)
    names.check_dump_date(date)
    hint = " (set TMPDIR to a directory of your own)"
    base = private_dir(os.path.join(scratch_root(), "downloads"), what="scratch directory", hint=hint)
    _drop_stale_partials(base)
    scratch = private_dir(os.path.join(base, wiki), what="scratch directory", hint=hint)
    return private_dir(os.path.join(scratch, date), what="scratch directory", hint=hint)


def _drop_stale_partials(base: str) -> None:
    """Remove what killed downloads left and nobody resumed for `SCRATCH_DAYS`, and the emptied directories."""
    cutoff = time.time() - SCRATCH_DAYS * 86400
    for top, dirs, files in os.walk(base, topdown=False):
        for name in files:
            path = os.path.join(top, name)
            with suppress(FileNotFoundError):
                if os.lstat(path).st_mtime < cutoff:
                    os.remove(path)
        for name in dirs:
            with suppress(OSError):  # only empty ones go
                os.rmdir(os.path.join(top, name))


def _open_partial(partial: str, append: bool) -> BinaryIO:
    """The partial file for writing, never through a symlink: appended to as it is, or created afresh
    (O_EXCL after removing what was there, so nothing planted between the two is written through)."""
    if append:
        fd = os.open(partial, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    else:
        with suppress(FileNotFoundError):
            os.remove(partial)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


def _transfer(http: MirrorHttp, f: RemoteFile, partial: str, progress: bool) -> bool:
    """Bring `partial` up to the whole file, resuming with Range requests, retrying with backoff.

    Returns whether any bytes were kept from an earlier attempt (a resumed transfer).
    """
    resumed = False
    last_error = ""
    if os.path.islink(partial):  # never resumed into nor written through: whoever planted it gets nothing
        os.remove(partial)
    for attempt in range(http.retries + 1):
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        if f.size is not None and have == f.size:
            return resumed or have > 0
        if f.size is not None and have > f.size:
            os.remove(partial)
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with http.client.stream("GET", f.url, headers=headers) as response:
                if response.status_code == 404:
                    raise NotFound(f"{f.url}: not found on the mirror")
                if response.status_code == 416 and have:
                    os.remove(partial)  # our partial is longer than the file: start again
                    continue
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    raise DownloadError(f"{f.url}: HTTP {response.status_code}")
                if response.status_code >= 400:
                    raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request,
                                                response=response)
                append = bool(have) and response.status_code == 206
                resumed = resumed or append
                with _open_partial(partial, append) as out, \
                        _bar(f.name, f.size, progress, initial=have if append else 0) as bar:
                    for block in response.iter_raw():  # unbuffered: a cut keeps what arrived
                        out.write(block)
                        bar.update(len(block))
            if f.size is None or os.path.getsize(partial) == f.size:
                return resumed
            last_error = f"got {os.path.getsize(partial)} of {f.size} bytes"
        except httpx.HTTPError as exc:
            last_error = str(exc) or type(exc).__name__
        if attempt < http.retries:
            time.sleep(http.backoff_s * 2**attempt)
    raise DownloadError(f"download of {f.name} from {f.url} failed after {http.retries + 1} attempts: "
                        f"{last_error}; rerun to resume")

