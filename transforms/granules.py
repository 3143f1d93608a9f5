"""Stage 2: per-band files -> one complete TileRef per granule.

HLS and Sentinel-2 deliver one COG per band, each with its own notification, in any order. Bands
are collected per granule id; the granule is emitted once every band the model card needs has
arrived. A granule still incomplete after the timeout goes to the dead letters naming the missing
bands, one letter carrying every band message it held. After emitting (or expiring), the granule
remembers it for the dedup TTL: a re-delivered band of a complete granule is a duplicate, and a
band that arrives after its granule was dead-lettered is booked at once, saying so, instead of
starting a phantom granule that would expire again.

A drain (the stream's input ends) is not a timeout: bands still missing may reach the next job.
The bands held then become one ``drained`` event naming every band message and URI, never a
"missing bands" refusal, and nothing is remembered as expired.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, on_timer

from transforms import timeouts
from transforms.announcements import content_generation
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter, drained, duplicate, superseded
from transforms.presets import acquired_from_name
from transforms.records import KEYED, BandObject, TileRef

STAGE = "granules"


class _AssembleGranuleFn(beam.DoFn):
    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    BANDS = BagStateSpec("bands", PickleCoder())
    DONE = ReadModifyWriteStateSpec("done", BooleanCoder())
    EXPIRED = ReadModifyWriteStateSpec("expired", PickleCoder())  # (when, missing bands)

    def __init__(self, bands: Sequence[str], timeout_secs: float, ttl_secs: float,
                 streaming: bool):
        self._bands = tuple(bands)
        self._timeout = timeout_secs
        self._ttl = ttl_secs
        self._streaming = streaming
        self.complete = Metrics.counter("tilestream", "granules_complete")
        self.used = Metrics.counter("tilestream", "bands_used")
        self.duplicates = Metrics.counter("tilestream", "bands_duplicate")
        self.expired = Metrics.counter("tilestream", "bands_expired")
        self.late = Metrics.counter("tilestream", "bands_late")

    def process(
        self,
        element: tuple[str, BandObject],
        bands=beam.DoFn.StateParam(BANDS),
        done=beam.DoFn.StateParam(DONE),
        expired=beam.DoFn.StateParam(EXPIRED),
        wall=beam.DoFn.TimerParam(WALL_CLOCK),
        end=beam.DoFn.TimerParam(END_OF_INPUT),
    ):
        granule_id, band = element
        if done.read():
            self.duplicates.inc()
            yield duplicate(STAGE, f"band {band.band} of granule {granule_id} arrived after the "
                            "granule was complete", message_id=band.message_id,
                            tile_id=granule_id)
            return
        gone = expired.read()
        if gone is not None:
            when, missing = gone
            self.late.inc()
            yield dead_letter(
                STAGE, f"band {band.band} of granule {granule_id} arrived "
                f"{max(0.0, time.time() - when):.0f}s after the granule was dead-lettered as "
                f"incomplete (missing {missing}); its other bands were booked then: publish "
                "the granule's bands again", message_id=band.message_id, tile_id=granule_id,
                payload=band.uri)
            return
        held = list(bands.read())
        if any(b.band == band.band and b.generation == band.generation for b in held):
            self.duplicates.inc()
            yield duplicate(STAGE, f"band {band.band} of granule {granule_id} delivered twice",
                            message_id=band.message_id, tile_id=granule_id)
            return
        if not held:
            timeouts.arm(wall, end, self._streaming, self._timeout)
        bands.add(band)
        latest = {b.band: b for b in (*held, band)}  # a newer generation replaces an older one
        if all(name in latest for name in self._bands):
            chosen = [latest[name] for name in self._bands]
            self.complete.inc()
            self.used.inc(len(chosen))
            self.duplicates.inc(len(held) + 1 - len(chosen))
            for older in (b for b in held if b not in chosen):
                yield superseded(STAGE, f"band {older.band} of granule {granule_id}: "
                                 f"generation {older.generation} superseded by a newer one",
                                 message_id=older.message_id, tile_id=granule_id)
            bands.clear()
            done.write(True)
            timeouts.arm(wall, end, self._streaming, self._ttl)
            event_time = max(b.event_time for b in chosen)
            yield beam.window.TimestampedValue(
                TileRef(
                    tile_id=granule_id,
                    band_uris=tuple(b.uri for b in chosen),
                    generation=content_generation(*((b.uri, b.generation) for b in chosen)),
                    event_time=event_time,
                    published=max(b.published for b in chosen),
                    message_id=band.message_id,
                    source="granule",
                    band_message_ids=tuple(b.message_id for b in chosen if b.message_id),
                    band_generations=(tuple(b.generation for b in chosen)
                                      if all(b.source == "gcs" for b in chosen) else ()),
                    acquired=acquired_from_name(granule_id),
                ),
                event_time,
            )

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, key=beam.DoFn.KeyParam, bands=beam.DoFn.StateParam(BANDS),
                      done=beam.DoFn.StateParam(DONE), expired=beam.DoFn.StateParam(EXPIRED),
                      wall=beam.DoFn.TimerParam(WALL_CLOCK),
                      end=beam.DoFn.TimerParam(END_OF_INPUT)):
        yield from self._expire(key, bands, done, expired, wall, end)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, key=beam.DoFn.KeyParam, bands=beam.DoFn.StateParam(BANDS),
                        done=beam.DoFn.StateParam(DONE), expired=beam.DoFn.StateParam(EXPIRED),
                        wall=beam.DoFn.TimerParam(WALL_CLOCK),
                        end=beam.DoFn.TimerParam(END_OF_INPUT)):
        if not self._streaming:  # a backfill's input is all read: the timeout
            yield from self._expire(key, bands, done, expired, wall, end)
            return
        held = list(bands.read())
        for state in (bands, done, expired):
            state.clear()
        wall.clear()  # its watermark hold would keep the drain waiting for the timeout
        if not held:
            return
        present = sorted({b.band for b in held})
        missing = [b for b in self._bands if b not in present]
        yield drained(
            STAGE,
            f"granule {key} drained before complete: this job's input ended with bands "
            f"{present} in and {missing} missing; the next job completes it if the bands held "
            f"here are published again with the rest (held: {', '.join(b.uri for b in held)})",
            message_ids=tuple(b.message_id for b in held if b.message_id), tile_id=key)

    def _expire(self, granule_id, bands, done, expired, wall, end):
        """The timeout of an incomplete granule (one letter, every band message it held), or
        the end of the TTL of a finished or expired one (its memory cleared)."""
        held = list(bands.read())
        bands.clear()
        done.clear()
        expired.clear()
        if not held:
            return
        self.expired.inc(len(held))
        present = sorted({b.band for b in held})
        missing = [b for b in self._bands if b not in present]
        expired.write((time.time(), missing))
        if self._streaming:  # remember it, so a late band is booked at once
            timeouts.arm(wall, end, self._streaming, self._ttl)
        yield dead_letter(
            STAGE,
            f"granule {granule_id} incomplete after {self._timeout:.0f}s: missing bands "
            f"{missing} (have {present})",
            message_ids=tuple(b.message_id for b in held if b.message_id),
            tile_id=granule_id,
            payload=[b.uri for b in held],
        )


class AssembleGranules(beam.PTransform):
    """BandObject -> TileRef (band URIs in card order) + dead letters for incomplete granules."""

    def __init__(self, bands: Sequence[str], timeout_secs: float, ttl_secs: float,
                 streaming: bool):
        super().__init__()
        self._fn = _AssembleGranuleFn(bands, timeout_secs, ttl_secs, streaming)

    def expand(self, band_objects):
        return (
            band_objects
            | "KeyByGranule" >> beam.Map(lambda b: (b.granule_id, b)).with_output_types(KEYED)
            | "Assemble" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG, main="tiles")
        )
