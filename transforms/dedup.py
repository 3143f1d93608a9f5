"""Stage 3: drop re-deliveries of a tile version already accepted.

Pub/Sub is at-least-once, and GCS may notify the same object generation twice. A tile version is
``tile_id@generation``; the first one passes, later ones within the TTL are counted and dropped
(they are not errors). A new generation of the same tile is a new version and is scored.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, on_timer

from transforms import timeouts
from transforms.deadletter import DEAD_LETTER_TAG, duplicate
from transforms.records import KEYED, TileRef


class _FirstSeenFn(beam.DoFn):
    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())

    def __init__(self, ttl_secs: float, streaming: bool):
        self._ttl = ttl_secs
        self._streaming = streaming
        self.accepted = Metrics.counter("tilestream", "tiles_accepted")
        self.duplicates = Metrics.counter("tilestream", "tiles_duplicate")

    def process(
        self,
        element: tuple[str, TileRef],
        seen=beam.DoFn.StateParam(SEEN),
        wall=beam.DoFn.TimerParam(WALL_CLOCK),
        end=beam.DoFn.TimerParam(END_OF_INPUT),
    ):
        if seen.read():
            self.duplicates.inc()
            tile = element[1]
            yield duplicate("dedup", f"tile version {tile.key} already taken", tile=tile)
            return
        seen.write(True)
        timeouts.arm(wall, end, self._streaming, self._ttl)
        self.accepted.inc()
        yield element[1]

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, seen=beam.DoFn.StateParam(SEEN),
                        wall=beam.DoFn.TimerParam(WALL_CLOCK)):
        seen.clear()
        wall.clear()  # at a drain, its watermark hold would keep the drain waiting up to the TTL


class Deduplicate(beam.PTransform):
    """TileRef -> first delivery of each version (``tiles``) + ``duplicate`` events."""

    def __init__(self, ttl_secs: float, streaming: bool):
        super().__init__()
        self._fn = _FirstSeenFn(ttl_secs, streaming)

    def expand(self, tiles):
        return (
            tiles
            | "KeyByVersion" >> beam.Map(lambda t: (t.key, t)).with_output_types(KEYED)
            | "FirstSeen" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG, main="tiles")
        )
