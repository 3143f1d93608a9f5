"""Which COGs the map's tiler may open: only prediction rasters under the stream's output prefix.

TiTiler's endpoints take a ``url``; GDAL would open anything behind it (``http://`` to a metadata
server, ``/vsicurl/``, local files, another bucket). The map accepts exactly ``gs://`` objects
under the output prefix, by the stream's own input rule (:class:`transforms.guards.InputAllowList`:
no ``..``/empty segments, no ``?``/``#``/``\\``/``%``, ``.tif``), plus what a URL adds: no
whitespace, and only the characters the stream itself writes into object names.
"""

from __future__ import annotations

import re

from transforms.guards import InputAllowList, Refused

# What assemble.raster_uri builds from checked segments (safe ids, '@', '=' of partitions).
_OBJECT_CHARS = re.compile(r"gs://[a-z0-9][a-z0-9_.\-]*/[A-Za-z0-9_.=@/\-]+")


class CogAllowList:
    """The stream's output prefix, as the one place the map reads rasters from."""

    def __init__(self, output_prefix: str):
        self.prefix = output_prefix.rstrip("/") + "/"
        self._rule = InputAllowList.parse(self.prefix)

    def check(self, url: object) -> str:
        """``url`` when the map may open it, else :class:`Refused` saying why."""
        if isinstance(url, str) and not _OBJECT_CHARS.fullmatch(url):
            raise Refused(f"url {url[:120]!r} is not a gs:// object name (no '%', spaces, "
                          "schemes other than gs:// or GDAL /vsi paths)")
        return self._rule.check(url, "url")
