"""The chipper's raster-handle cache: a long stream keeps a bounded number of files open, closes
the oldest first, and never keeps a handle whose opening failed."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from transforms.rasters import OPEN_TILES, RasterCache
from transforms.records import TileRef


def _tile(name: str, generation: str = "1") -> TileRef:
    return TileRef(name, (f"gs://b/{name}.tif",), generation, 0.0, 0.0,
                   band_generations=(generation,))


def test_the_cache_keeps_a_few_tiles_open_and_closes_the_oldest_first():
    opened, closed = [], []

    def opener(name):
        def open_(stack: ExitStack):
            opened.append(name)
            stack.callback(closed.append, name)
            return f"rasters of {name}"
        return open_

    cache = RasterCache()
    names = [f"t{i}" for i in range(OPEN_TILES + 2)]
    for name in names:
        assert cache.get(_tile(name), opener(name)) == f"rasters of {name}"
        assert cache.get(_tile(name), opener(name)) == f"rasters of {name}"  # kept, not reopened
    assert opened == names and closed == names[:2] and len(cache) == OPEN_TILES
    # another generation of a kept tile is another file: opened apart
    cache.get(_tile(names[-1], "2"), opener("t-new"))
    assert opened[-1] == "t-new" and closed == names[:3]
    cache.close(_tile(names[-1]))
    assert closed[-1] == names[-1]
    cache.close()
    assert sorted(closed) == sorted([*names, "t-new"]) and len(cache) == 0


def test_a_failed_open_keeps_nothing_and_releases_what_it_held():
    closed = []

    def broken(stack: ExitStack):
        stack.callback(closed.append, "first band")
        raise OSError("second band unreadable")

    cache = RasterCache()
    with pytest.raises(OSError, match="second band"):
        cache.get(_tile("t"), broken)
    assert closed == ["first band"] and len(cache) == 0
