"""Only for this machine, never shipped to or run on Dataflow: the emulator stack (``stack``,
the GCS emulator wrapper ``gcs_emulator``, the recording proxies ``audit``), every patch that
points Beam and Google clients at it or takes a cost out of the in-process runner
(``patches``), the journal that makes the in-process runner's early acks safe (``journal``),
and the ``demo`` and ``smoke`` commands with the demo's ``quicklook``.

``pipeline.main`` imports any of it only with ``--local``, which it refuses with any runner that
is not in this process (``tests/test_dataflow.py`` checks a Dataflow launch imports none of it).
"""
