"""Only for the local stack, never used on Dataflow: the emulators (``stack``), the adapter that
points Beam's clients at them (``adapter``), the journal that makes the in-process runner's
early acks safe (``journal``), the GCS emulator wrapper (``gcs_emulator``) and a memo of the
in-process runner's per-bundle DoFn introspection (``runner``).

``pipeline.main`` applies any of it only with ``--local``, which it refuses with any runner that
is not in this process; nothing here runs on a Dataflow worker.
"""
