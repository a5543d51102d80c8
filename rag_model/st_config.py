"""A sentence-transformers model's own conventions: pooling, normalisation and max sequence length.

sentence-transformers saves them beside the weights (`modules.json`, the Pooling module's
`config.json`, `sentence_bert_config.json`). A mean-kind encoder that ignored them would, for
example, leave all-MiniLM-L6-v2's vectors unnormalised and rank worse without saying so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# sentence-transformers' pooling flags, in the order it checks them, and what ragindex calls them.
_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class SentenceTransformerConfig:
    """What the model directory declares; None where it declares nothing."""

    pooling: str | None = None  # mean / cls / max
    normalize: bool | None = None
    max_length: int | None = None


def _read(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_st_config(directory: Path) -> SentenceTransformerConfig:
    """The conventions a sentence-transformers model directory declares (empty for any other model).

    An unreadable or foreign file counts as absent: the model still loads, with ragindex's defaults.
    """
    modules = _read(directory / "modules.json")
    if not isinstance(modules, list):
        return SentenceTransformerConfig()
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pooling = None
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            config = _read(directory / str(module.get("path", "")) / "config.json")
            if isinstance(config, dict):
                modes = [name for flag, name in _POOLING_FLAGS.items() if config.get(flag)]
                others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v
                          and k not in _POOLING_FLAGS]
                if len(modes) == 1 and not others:
                    pooling = modes[0]
                elif modes or others:
                    pooling = "+".join(modes + [k.removeprefix("pooling_mode_") for k in others])
            break
    bert = _read(directory / "sentence_bert_config.json")
    max_length = bert.get("max_seq_length") if isinstance(bert, dict) else None
    return SentenceTransformerConfig(
        pooling=pooling,
        normalize=any(t.endswith(".Normalize") for t in types),
        max_length=int(max_length) if isinstance(max_length, int) and max_length > 0 else None,
    )


def resolve(declared: SentenceTransformerConfig, model: str, normalize: bool | None,
            max_length: int | None) -> tuple[bool, int]:
    """(normalize, max_length) to use: the flag when given, else the model's, else ragindex's default.

    A flag that contradicts what the model declares is honoured, with a one-line warning.
    """
    if normalize is None:
        normalize = bool(declared.normalize)
    elif declared.normalize is not None and normalize != declared.normalize:
        log.warning("encoder %s: its sentence-transformers config %s normalisation; --%snormalize overrides it",
                    model, "declares" if declared.normalize else "has no", "" if normalize else "no-")
    if max_length is None:
        max_length = declared.max_length or 256
    elif declared.max_length is not None and max_length != declared.max_length:
        log.warning("encoder %s: its sentence-transformers config says max_seq_length %d; --max-length %d "
                    "overrides it", model, declared.max_length, max_length)
    return normalize, max_length
