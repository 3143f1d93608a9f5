"""The stream, assembled from its stages; reads like docs/ARCHITECTURE.md's diagram."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io import fileio

from model.card import ModelCard
from model.serving import Snapshot
from pipeline.options import (
    LATENCY_SLO_S,
    TileStreamOptions,
    load_temp_location,
    release_prefix,
)
from transforms import presets
from transforms.announcements import ENTRIES_TAG, FilesToRefs, GranuleRule, ParseAnnouncements
from transforms.assemble import AssembleTiles
from transforms.change_rules import load_rules
from transforms.changes import DetectChanges
from transforms.chips import ChipSettings, ChipTiles
from transforms.deadletter import BigQueryFailures, CheckRows, WriteDeadLetters
from transforms.dedup import Deduplicate
from transforms.drift_watch import FlagDriftChanges
from transforms.granules import AssembleGranules
from transforms.guards import InputAllowList
from transforms.inference import ScoreChips
from transforms.results import PublishResults, check_secs
from transforms.routing import AssignModels
from transforms.sinks import (
    CHANGE_SCHEMA,
    CHIP_SCHEMA,
    MESSAGE_SCHEMA,
    TILE_SCHEMA,
    BigQueryTables,
    WriteRows,
    chip_rows,
)
from transforms.slis import CountTileSlis


def build(p: beam.Pipeline, o: TileStreamOptions, card: ModelCard, tables: BigQueryTables,
          streaming: bool, allow: InputAllowList, chip_settings: ChipSettings,
          start: Snapshot | None = None) -> None:
    bands = card.input.bands
    rule = GranuleRule(*presets.resolve(o.band_preset, o.granule_pattern, o.band_aliases))
    class_names = tuple(c.name for c in card.classes)

    if o.input_glob:
        parsed = (p | "MatchFiles" >> fileio.MatchFiles(o.input_glob)
                    | "FilesToRefs" >> FilesToRefs(bands, rule, allow))
    else:
        parsed = (p | "ReadPubSub" >> beam.io.ReadFromPubSub(subscription=o.subscription,
                                                               with_attributes=True)
                    | "ParseAnnouncements" >> ParseAnnouncements(bands, rule, allow))

    _ = parsed[ENTRIES_TAG] | "MessagesIn" >> WriteRows(tables.messages, MESSAGE_SCHEMA,
                                                         o.release)
    granules = parsed.bands | "AssembleGranules" >> AssembleGranules(
        bands, o.granule_timeout_secs, o.dedup_ttl_secs, streaming)
    deduped = ((parsed.tiles, granules.tiles)
               | "AllTiles" >> beam.Flatten()
               | "Deduplicate" >> Deduplicate(o.dedup_ttl_secs, streaming))

    letters = [deduped.dead_letters]
    tiles = deduped.tiles
    registry = o.model_registry if start is not None else None
    if registry:  # one element per (version, role) the channels assign to the tile
        routed = tiles | "AssignModels" >> AssignModels(registry, card, start,
                                                        o.channels_poll_secs, o.release)
        tiles = routed.tiles
        letters.append(routed.dead_letters)
    chipped = tiles | "ChipTiles" >> ChipTiles(chip_settings, streaming)
    scored = chipped.chips | "ScoreChips" >> ScoreChips(
        card, window_secs=o.window_secs, device=o.device, min_batch_size=o.min_batch_size,
        max_batch_size=o.max_batch_size,
        max_batch_duration_secs=o.max_batch_duration_secs or None, accelerator=o.accelerator,
        registry_uri=registry)

    rows = scored.predictions | "ChipRows" >> beam.FlatMap(chip_rows, class_names)
    if o.chip_rows_load_secs:  # load jobs: rows that would fail one are dead-lettered first
        checked = rows | "CheckChipRows" >> CheckRows(tables.chips, CHIP_SCHEMA)
        _ = checked.rows | "LoadChipRows" >> WriteRows(
            tables.chips, CHIP_SCHEMA, o.release, load_jobs=True,
            every_secs=o.chip_rows_load_secs if streaming else None,
            temp_location=load_temp_location(o))
        chip_failures = checked.dead_letters
    else:
        chip_failures = (rows | "WriteChipRows" >> WriteRows(tables.chips, CHIP_SCHEMA, o.release)
                         ).failed_rows_with_errors | "ChipRowFailures" >> BigQueryFailures()
    assembled = ((chipped.manifests, chipped.reports, scored.predictions, scored.failed)
                 | "AssembleTiles" >> AssembleTiles(card, release_prefix(o), o.tile_timeout_secs,
                                                    streaming, o.confidence_band, registry))
    tile_writes = assembled.tiles | "WriteTileRows" >> WriteRows(tables.tiles, TILE_SCHEMA,
                                                                 o.release)
    _ = assembled.tiles | "TileSlis" >> beam.ParDo(CountTileSlis(LATENCY_SLO_S))  # SLI counters
    letters.append(assembled.tiles | "DriftChanges" >> FlagDriftChanges())  # over time
    # Change between acquisitions of a location (docs/changes.md); history seeded from `tiles`.
    detected = assembled.tiles | "DetectChanges" >> DetectChanges(
        load_rules(o.change_rules), tables.tiles, class_names,
        tuple(c.rgb for c in card.classes), o.change_history)
    change_writes = detected.changes | "WriteChangeRows" >> WriteRows(
        tables.changes, CHANGE_SCHEMA, o.release)
    letters.append(detected.dead_letters)
    letters.append(change_writes.failed_rows_with_errors
                   | "ChangeRowFailures" >> BigQueryFailures())

    tile_failures = tile_writes.failed_rows_with_errors | "TileRowFailures" >> BigQueryFailures()
    all_letters = ((parsed.dead_letters, granules.dead_letters, *letters, chipped.dead_letters,
                    scored.dead_letters, assembled.dead_letters, chip_failures, tile_failures)
                   | "AllDeadLetters" >> beam.Flatten())
    _ = all_letters | "WriteDeadLetters" >> WriteDeadLetters(tables, o.output_prefix, o.release)
    if o.results_topic:  # events for consumers, once what they say is readable
        dataset = tables.tiles.rsplit(".", 1)[0].replace(":", ".")
        follower = (registry, card, start, o.channels_poll_secs) if registry else None
        _ = ({"answers": detected.answers, "changes": detected.changes, "letters": all_letters}
             | "PublishResults" >> PublishResults(
                 o.results_topic, dataset, o.release, check_secs=check_secs(
                     o.chip_rows_load_secs), wait_secs=o.results_wait_secs,
                 streaming=streaming, follower_args=follower)
             | "WriteResultDeadLetters" >> WriteDeadLetters(tables, o.output_prefix, o.release))
