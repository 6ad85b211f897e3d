"""What the benchmark scripts share: the offline assets, their arguments, the backbones.

The assets live in the ``shared`` folder beside the checkout (``SELFMENT_SHARED`` names
another); tests/conftest.py reads the same paths.

Every script runs both as ``python benchmarks/X.py`` and as ``python -m benchmarks.X``: run
as a file, a script first puts the checkout on ``sys.path`` (two lines at its top, before it
imports ``benchmarks._common``), so both forms import ``benchmarks.*`` the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from selfment_label.config import DEFAULT_BACKBONE
from selfment_label.features.backbone import Backbone, build_backbone

SHARED = Path(os.environ.get("SELFMENT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "weights" / "dinov2_vits14.safetensors"
ECSSD = SHARED / "data" / "ecssd-dev"
COCO = SHARED / "data" / "coco-dev"
TINY_RESOLUTION = 112
"""The tiny backbone's image size: 8 x 8 patches of 14 px."""


def add_asset_arguments(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """Add ``--weights`` (default: the shared DINOv2 ViT-S/14) and, with ``data``, ``--data``
    (default: the shared ecssd-dev folder, ``images/`` and ``masks/``)."""
    if data:
        parser.add_argument("--data", type=Path, default=ECSSD, help="images/ and masks/ here.")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="Backbone weights file.")


def require_assets(data: Path, weights: Path) -> None:
    """Stop with one sentence when the dev images or the weights are missing."""
    if not (data / "images").is_dir() or not Path(weights).is_file():
        raise SystemExit(f"needs {data}/images and {weights} (see {SHARED}/README.md)")


def tiny_backbone() -> Backbone:
    """A randomly initialised two-block ViT with patch 14 (seeded with 0), for what does not
    depend on the model: the tests' plumbing and the Ray driver benchmark."""
    torch.manual_seed(0)
    return build_backbone(
        DEFAULT_BACKBONE,
        random_init=True,
        depth=2,
        embed_dim=64,
        num_heads=2,
        img_size=TINY_RESOLUTION,
    )


def load_backbone(weights: str | Path, device: str = "cpu") -> Backbone:
    """The default backbone from a local weights file (never downloaded)."""
    return build_backbone(DEFAULT_BACKBONE, weights, device, allow_download=False)
