"""Deterministic train / validation / test split by a hash of each file's name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SPLITS = ("train", "val", "test")
VALIDATION_PERCENT = 10
TEST_PERCENT = 10


def split_of(path: str | Path) -> str:
    """The split of a file, from its base name only, so copies and moved folders keep their split."""
    digest = hashlib.sha1(os.path.basename(os.fspath(path)).encode()).digest()  # os.path: fast per file
    bucket = int.from_bytes(digest[:4], "big") % 100
    if bucket < VALIDATION_PERCENT:
        return "val"
    if bucket < VALIDATION_PERCENT + TEST_PERCENT:
        return "test"
    return "train"
