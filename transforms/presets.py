"""Band presets: what the public collections call their bands, and when their granules were taken.

A preset names one product (HLS S30/L30, Landsat 7/8 Collection 2 Level-2, Sentinel-2 L2A) and
says how its per-band file names look (granule pattern), which file or asset token is which
model-card band (aliases), and where the acquisition time sits in a granule name. The stream uses
a preset for ``--band_preset``; without one, the product whose name pattern matches a granule
still gives ``acquired``, and a band token that the stream's aliases do not map is reported with
the presets that would map it.

Pure Python with no Beam or torch import: ``tilestream run --help`` reads these.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The stream's defaults: HLS (HLS.S30.T17SLU.2024110T160000.v2.0.B04.tif), Landsat C2
# (…_SR_B4.TIF) and similar file names; HLS S30 / Sentinel-2 band tokens.
DEFAULT_GRANULE_PATTERN = r"^(?P<granule>.+?)[._](?:SR_)?(?P<band>B\d{1,2}A?)\.tiff?$"
DEFAULT_BAND_ALIASES = "B02=blue,B03=green,B04=red,B8A=nir,B11=swir1,B12=swir2"

# STAC ``eo:bands[].common_name`` (and STAC 1.1 ``eo:common_name``) -> model-card band, in order of
# preference when an item offers several: narrow NIR (what HLS harmonises on) before broad NIR.
COMMON_NAMES: dict[str, tuple[str, ...]] = {
    "blue": ("blue",),
    "green": ("green",),
    "red": ("red",),
    "nir": ("nir08", "nir"),
    "swir1": ("swir16", "swir1"),
    "swir2": ("swir22", "swir2"),
}


@dataclass(frozen=True)
class Preset:
    """One product's naming: granule pattern, token -> card band, where ``acquired`` is."""

    name: str
    description: str
    product: str  # regex on a granule id / file name that says "this is that product"
    granule_pattern: str
    aliases: Mapping[str, str]  # upper-case file/asset token -> card band
    acquired: str  # regex with named groups: (year, doy, time) or (date)

    def acquired_from(self, name: str) -> str | None:
        """RFC 3339 acquisition time from a granule id or file name of this product, or None."""
        if not re.search(self.product, name):
            return None
        found = re.search(self.acquired, name)
        if not found:
            return None
        parts = found.groupdict()
        try:
            if parts.get("doy"):
                day = dt.datetime.strptime(f"{parts['year']}{parts['doy']}", "%Y%j")
            else:
                day = dt.datetime.strptime(parts["date"], "%Y%m%d")
            clock = parts.get("time") or "000000"
            when = day.replace(hour=int(clock[:2]), minute=int(clock[2:4]),
                               second=int(clock[4:6]), tzinfo=dt.UTC)
        except ValueError:
            return None
        if not 1970 <= when.year <= 2100:
            return None
        return when.isoformat().replace("+00:00", "Z")


_HLS_PATTERN = (r"^(?P<granule>HLS\.[SL]30\.T\d{2}[A-Z]{3}\.\d{7}T\d{6}\.v\d+\.\d+)\."
                r"(?P<band>B\d{2}|B8A|Fmask|SAA|SZA|VAA|VZA)\.tiff?$")
_HLS_ACQUIRED = r"\.(?P<year>\d{4})(?P<doy>\d{3})T(?P<time>\d{6})\."
_LANDSAT_PATTERN = (r"^(?P<granule>L[CEOT]0\d_L2S[PR]_\d{6}_\d{8}_\d{8}_\d{2}_(?:T1|T2|RT))_"
                    r"(?:SR_|ST_)?(?P<band>B\d{1,2}|QA_PIXEL|QA_RADSAT|QA_AEROSOL|CLOUD_QA|"
                    r"ATMOS_OPACITY|QA|TRAD|URAD|DRAD|ATRAN|EMIS|EMSD|CDIST)\.tiff?$")
_LANDSAT_ACQUIRED = r"^L[CEOT]0\d_L\w{3}_\d{6}_(?P<date>\d{8})_"
_S2_PATTERN = (r"^(?P<granule>(?:S2[ABC]_MSIL2A_\d{8}T\d{6}_\w+?_)?T\d{2}[A-Z]{3}_\d{8}T\d{6})_"
               r"(?P<band>B\d{2}|B8A|SCL|AOT|WVP|TCI)(?:_\d{2}m)?\.tiff?$")
_S2_ACQUIRED = r"T\d{2}[A-Z]{3}_(?P<date>\d{8})T(?P<time>\d{6})"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("hls-s30", "HLS v2 Sentinel-2 (S30): HLS.S30.T17SLU.2024110T160000.v2.0.B04.tif",
           r"^HLS\.S30\.", _HLS_PATTERN,
           {"B02": "blue", "B03": "green", "B04": "red", "B8A": "nir", "B11": "swir1",
            "B12": "swir2"}, _HLS_ACQUIRED),
    Preset("hls-l30", "HLS v2 Landsat (L30): HLS.L30.T17SLU.2024110T155000.v2.0.B05.tif",
           r"^HLS\.L30\.", _HLS_PATTERN,
           {"B02": "blue", "B03": "green", "B04": "red", "B05": "nir", "B06": "swir1",
            "B07": "swir2"}, _HLS_ACQUIRED),
    Preset("landsat7-c2", "Landsat 7 ETM+ Collection 2 Level-2: LE07_L2SP_217065_20010715_"
           "20200917_02_T1_SR_B1.TIF", r"^LE07_", _LANDSAT_PATTERN,
           {"B1": "blue", "B2": "green", "B3": "red", "B4": "nir", "B5": "swir1", "B7": "swir2"},
           _LANDSAT_ACQUIRED),
    Preset("landsat8-c2", "Landsat 8/9 OLI Collection 2 Level-2: LC08_L2SP_014035_20240419_"
           "20240425_02_T1_SR_B5.TIF", r"^LC0[89]_", _LANDSAT_PATTERN,
           {"B2": "blue", "B3": "green", "B4": "red", "B5": "nir", "B6": "swir1", "B7": "swir2"},
           _LANDSAT_ACQUIRED),
    Preset("sentinel2-l2a", "Sentinel-2 L2A per-band GeoTIFFs: T17SLU_20240419T160001_B8A_20m.tif",
           r"(?:^|_)T\d{2}[A-Z]{3}_\d{8}T\d{6}(?:_|$)", _S2_PATTERN,
           {"B02": "blue", "B03": "green", "B04": "red", "B8A": "nir", "B11": "swir1",
            "B12": "swir2"}, _S2_ACQUIRED),
)}


class PresetError(ValueError):
    """An unknown preset name or an alias spec that cannot be read."""


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown --band_preset '{name}'; choose one of "
                          f"{', '.join(PRESETS)}") from None


def parse_aliases(spec: str) -> dict[str, str]:
    """``"B02=blue,B03=green"`` -> ``{"B02": "blue", "B03": "green"}`` (tokens upper-cased)."""
    aliases = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        token, sep, band = item.partition("=")
        if not sep or not token.strip() or not band.strip():
            raise PresetError(f"band alias '{item}' is not TOKEN=band")
        aliases[token.strip().upper()] = band.strip()
    return aliases


def resolve(band_preset: str | None, granule_pattern: str,
            band_aliases: str) -> tuple[str, dict[str, str]]:
    """(granule pattern, aliases) the stream uses.

    A preset supplies both; an explicit ``--granule_pattern`` (one that is not the default)
    replaces the preset's, and explicit ``--band_aliases`` entries are laid over the preset's.
    """
    if not band_preset:
        return granule_pattern, parse_aliases(band_aliases)
    chosen = preset(band_preset)
    pattern = (chosen.granule_pattern if granule_pattern == DEFAULT_GRANULE_PATTERN
               else granule_pattern)
    aliases = dict(chosen.aliases)
    if band_aliases != DEFAULT_BAND_ALIASES:
        aliases.update(parse_aliases(band_aliases))
    return pattern, aliases


# A date in a granule name of no known product: HLS-style year, day of year and time
# (…2000100T150000…), or a calendar date and time (…20000409T150000…).
_ANY_DATE = Preset(
    name="(any)", description="", product=r".", granule_pattern="", aliases={},
    acquired=r"(?<!\d)(?:(?P<year>\d{4})(?P<doy>\d{3})|(?P<date>\d{8}))T(?P<time>\d{6})(?!\d)")


def acquired_from_name(name: str) -> str | None:
    """Acquisition time (RFC 3339) from a granule id or file name: a known product's rule first,
    else a year-day-time or date-time stamp wherever the name carries one."""
    for candidate in (*PRESETS.values(), _ANY_DATE):
        found = candidate.acquired_from(name)
        if found:
            return found
    return None


def band_file_hint(file_name: str, pattern: str, card_bands: Sequence[str]) -> str | None:
    """Why a band file the stream would misread deserves a report at once, or None.

    Two mistakes are caught when the file arrives rather than as a granule timeout later:

    - its token is one the stream's aliases map to no model band while a preset would (HLS L30's
      B05 is NIR, S30's red-edge; a Landsat ``SR_B1`` under the HLS default);
    - the stream's granule pattern does not match it, so it would be chipped as a whole
      one-band tile, while it is a band file of a known product.

    Bands a matching product has but the model does not use (HLS B01, Fmask) give None: they are
    filtered without a word.
    """
    found = re.match(pattern, file_name, re.IGNORECASE)
    products = [p for p in PRESETS.values() if re.search(p.product, file_name)]
    if found:
        token = found.group("band").upper()
        candidates = [p for p in (products or PRESETS.values())
                      if p.aliases.get(token) in card_bands]
        if not candidates:
            return None
        would = "; ".join(f"--band_preset {p.name} maps {token} to {p.aliases[token]}"
                          for p in candidates)
        return (f"band file {file_name} has band token {token}, which the stream's band "
                f"aliases map to no model band ({', '.join(card_bands)}): {would}")
    for product in products:
        own = re.match(product.granule_pattern, file_name, re.IGNORECASE)
        if own and product.aliases.get(own.group("band").upper()) in card_bands:
            return (f"band file {file_name} is a {product.name} band file (band token "
                    f"{own.group('band')}) that the stream's granule pattern does not match, so "
                    f"it would be read as a whole one-band tile: --band_preset {product.name} "
                    "reads it as a band of its granule")
    return None
