"""Byte sizes as people write them (`16GiB`, `512M`, `2000000000`) and as we print them, via pydantic.ByteSize."""

from __future__ import annotations

import re

from pydantic import ByteSize, TypeAdapter, ValidationError

_BYTE_SIZE = TypeAdapter(ByteSize)
# ByteSize wants a unit with its B (KiB, MB); people also write 512M or 16Gi.
_BARE_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'16GiB' / '512M' / 1234 -> bytes; a clear ValueError for anything else, negatives included."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    bare = _BARE_UNIT.match(str(text))
    try:
        value = int(_BYTE_SIZE.validate_python(f"{bare.group(1)}{bare.group(2)}B" if bare else str(text).strip()))
    except ValidationError:
        raise ValueError(f"not a size: {text!r} (examples: 16GiB, 512MiB, 2000000000)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    """1536 -> '1.5 KiB', 1023 -> '1023 B' (binary units, one decimal)."""
    text = ByteSize(int(n)).human_readable()
    number, unit = re.match(r"^([\d.]+)(\D+)$", text).groups()
    return f"{number} {unit}"
