"""The live map of scored tiles (``tilestream map``): a FastAPI app that serves one page, the
rows it draws (``/api/tiles``, polled from BigQuery) and the prediction COGs as map tiles through
TiTiler, limited to the stream's output prefix. Operator tooling: never shipped to workers."""
