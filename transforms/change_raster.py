"""The change raster (docs/changes.md): a from/to class COG beside the after prediction, and the
facts of its STAC Item. Called by the change step (``transforms/changes.py``) for each compared
pair a rule fires on; raster libraries load when one is written, not on import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from transforms.change_rules import Acquisition, utc_text
from transforms.guards import safe_id
from transforms.records import NODATA_CLASS


def change_raster_uri(before: Acquisition, after: Acquisition) -> str:
    """Beside the after tile's prediction COG, named by the before tile version."""
    stem = after.raster_uri[: -len(".tif")] if after.raster_uri.endswith(".tif") else \
        after.raster_uri
    return (f"{stem}.change-from-{safe_id(before.tile_id, 'tile_id')}-"
            f"{safe_id(before.generation, 'generation')}.tif")


def change_code(from_class: int, to_class: int, num_classes: int) -> int:
    """A change raster's pixel: ``from * K + to`` (K classes; K <= 15 fits uint8 under 255)."""
    return from_class * num_classes + to_class


def write_change_raster(before: Acquisition, after: Acquisition, class_names: Sequence[str],
                        colours: Sequence[tuple[int, int, int]], scratch: str | None,
                        ) -> tuple[str, str] | None:
    """The from/to change COG and its STAC Item beside the after prediction; None when the two
    predictions are not on the same grid (CRS, transform, shape), where pixels do not pair up."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from apache_beam.io.filesystems import FileSystems

    from transforms import cog, stac

    k = len(class_names)
    if k * k > NODATA_CLASS:
        return None
    with tempfile.TemporaryDirectory(prefix="change-", dir=scratch) as tmp:
        local = []
        for i, uri in enumerate((before.raster_uri, after.raster_uri)):
            local.append(os.path.join(tmp, f"{i}.tif"))
            with FileSystems.open(uri) as src, open(local[-1], "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
        with rasterio.open(local[0]) as b, rasterio.open(local[1]) as a:
            if (b.crs != a.crs or b.transform != a.transform or b.shape != a.shape):
                return None
            from_, to = b.read(1), a.read(1)
            profile = {"crs": a.crs, "transform": a.transform, "height": a.height,
                       "width": a.width}
        valid = (from_ != NODATA_CLASS) & (to != NODATA_CLASS) & (from_ < k) & (to < k)
        codes = np.where(valid, from_.astype(np.uint16) * k + to, NODATA_CLASS).astype(np.uint8)
        plain = os.path.join(tmp, "plain.tif")
        with rasterio.open(plain, "w", driver="GTiff", count=1, dtype="uint8",
                           nodata=NODATA_CLASS, **profile) as dst:
            dst.write(codes, 1)
            # Unchanged pixels grey, changed ones the colour of the class they became.
            dst.write_colormap(1, {change_code(f, t, k): ((128, 128, 128, 255) if f == t
                                                          else (*colours[t], 255))
                                   for f in range(k) for t in range(k)})
            dst.update_tags(1, encoding=f"from_class*{k}+to_class",
                            classes=",".join(class_names))
        out = os.path.join(tmp, "change.tif")
        rasterio.shutil.copy(plain, out, driver="COG", compress="DEFLATE",
                             overview_resampling="nearest")
        uri = change_raster_uri(before, after)
        cog.upload(out, uri)
        item_uri = stac.item_uri(uri)
        item = stac.change_item(
            before=_item_facts(before), after=_item_facts(after), href=item_uri, raster_uri=uri,
            transform=tuple(profile["transform"])[:6], crs=profile["crs"].to_string(),
            shape=(profile["height"], profile["width"]), class_names=class_names,
            codes=[(f, t, int(n)) for f in range(k) for t in range(k)
                   if (n := int(np.count_nonzero(codes == change_code(f, t, k))))])
        with FileSystems.create(item_uri, mime_type="application/geo+json") as sink:
            sink.write(json.dumps(item, indent=1).encode())
    return uri, item_uri


def _item_facts(a: Acquisition) -> dict[str, Any]:
    return {"tile_id": a.tile_id, "generation": a.generation, "acquired": utc_text(a.acquired),
            "model": a.model, "raster_uri": a.raster_uri, "stac_uri": a.stac_uri,
            "footprint": a.footprint}
