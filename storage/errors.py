"""Errors every layer raises and every edge (CLI, flow, server) turns into one readable line."""


class RagindexError(Exception):
    """An expected failure with a message fit to show a user as it is."""


class InvalidName(RagindexError):
    """A version id, file name or other name from outside that may not touch a path."""


class NotFound(RagindexError):
    """A version, file or pointer that does not exist."""


class Conflict(RagindexError):
    """A compare-and-swap lost its race, or a lock is held by someone else."""


class Rejected(RagindexError):
    """A version that failed validation, or another refusal of bad input."""


class Corrupt(Rejected):
    """A file whose bytes are not the bytes its manifest (or sidecar) names: missing, truncated or altered."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): what edges print."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class CorruptManifest(Rejected):
    """A version whose manifest cannot be read as one: listed as corrupt, never served or promoted."""


class Untrusted(Rejected):
    """A manifest that readers configured with trusted keys refuse: unsigned, wrongly signed, or signed
    by a key they do not trust."""
