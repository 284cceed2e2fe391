"""Shared fixtures. helpers.py holds the plain functions they wrap."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_imdb_archive


@pytest.fixture
def make_imdb_archive(tmp_path: Path):
    """Factory: make_imdb_archive([directory], n_per_class=20, unsup=10, seed=0,
    extra_members=None, drop_split=None) -> Path of a small official-layout .tar.gz."""
    counter = iter(range(1_000_000))

    def factory(directory: Path | None = None, **kwargs) -> Path:
        directory = Path(directory) if directory is not None else tmp_path
        return build_imdb_archive(directory / f"imdb-{next(counter)}.tar.gz", **kwargs)

    return factory
