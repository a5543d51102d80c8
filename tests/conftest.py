"""Shared pytest fixtures. Each fixture module is owned by the part of the system it serves."""

import os

# Model weights can never come from a hub here; fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.mirror",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.versions",
    "tests.fixtures.rag",
    "tests.fixtures.prefect",
    "tests.fixtures.eventstreams",
    "tests.fixtures.action_api",
]
