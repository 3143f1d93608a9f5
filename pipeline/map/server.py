"""``tilestream map``: serve the map of the local stack's stream or of one on Google Cloud."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.ops import clients

DEFAULT_HOST = "127.0.0.1"  # never every interface unless asked (--host)
DEFAULT_PORT = 8765
OUTPUT_PREFIX_ENV = "TILESTREAM_OUTPUT_PREFIX"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    clients.add_arguments(parser)
    parser.add_argument("--output_prefix", default=os.environ.get(OUTPUT_PREFIX_ENV),
                        metavar="gs://BUCKET/PREFIX", help="the stream's --output_prefix: the "
                        "only place map tiles are read from (default with --local: the stack's; "
                        f"else ${OUTPUT_PREFIX_ENV})")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default "
                        "%(default)s; Cloud Run's image binds 0.0.0.0 behind IAM)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)),
                        help="port (default $PORT or %(default)s)")
    parser.add_argument("--hours", type=float, default=24.0, help="tiles of the last N hours")
    parser.add_argument("--basemap", default=None, metavar="URL", help="an XYZ tile URL "
                        "template ({z}/{x}/{y}) drawn under the tiles; none by default, so the "
                        "page loads nothing from the internet")
    parser.add_argument("--model_uri", default=None, help="model whose card gives the legend "
                        "and the class colours (default: the shipped student)")
    parser.add_argument("--poll_s", type=float, default=5.0,
                        help="how often the page asks for new tiles (seconds)")


def build(args: argparse.Namespace):
    """The app the flags describe (local stack or GCP)."""
    from model.card import load_card
    from pipeline.map.app import MapConfig, create_app
    from pipeline.options import DEFAULT_MODEL_URI

    target = clients.resolve(args)
    prefix = args.output_prefix or (target.stack.output_prefix if target.stack else None)
    if not prefix:
        raise clients.TargetError(f"--output_prefix gs://BUCKET/PREFIX (or ${OUTPUT_PREFIX_ENV})"
                                  " is required without --local")
    gdal_env: dict[str, str] = {}
    if target.stack is not None:
        from pipeline.local.identity import authorization

        gdal_env = {k: v for k, v in target.stack.env().items()
                    if k in ("CPL_GS_ENDPOINT", "GS_NO_SIGN_REQUEST")}
        gdal_env["GDAL_HTTP_HEADERS"] = f"Authorization: {authorization()}"
    config = MapConfig(dataset=target.need_dataset(), output_prefix=prefix,
                       card=load_card(args.model_uri or DEFAULT_MODEL_URI, verify_weights=False),
                       hours=args.hours, basemap=args.basemap, poll_s=args.poll_s)
    client = target.bigquery()
    return create_app(config, lambda: client, gdal_env)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.map.app import VendorMissing

    try:
        app = build(args)
    except VendorMissing as exc:
        print(f"tilestream map: {exc}", file=sys.stderr)
        return 2
    print(f"tilestream map: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
