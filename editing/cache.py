"""On-disk caches (converted models, corpora, C0 statistics): where they live and how they are written safely."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_cache_dir() -> Path:
    """``$EDITING_CACHE`` or ``~/.cache/lifelong-editing``."""
    return Path(os.environ.get("EDITING_CACHE", Path.home() / ".cache" / "lifelong-editing"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or an error mid-write therefore never leaves a partial cache entry that a later run would trust.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
