"""selfment-label: object masks for a folder of images with no labels and no supervised model.

Self-supervised ViT patch features -> Normalized Cut -> Iterative Patch Optimization ->
COCO annotations with RLE masks. The public API:

    from selfment_label import RunConfig, InstancesConfig, label_folder
    summary = label_folder("images", "images-selfment", RunConfig(weights="vits14.safetensors"))

Names are imported on first use, so ``import selfment_label`` stays cheap (no torch).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("selfment-label")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

_PUBLIC = {
    "RunConfig": "config",
    "SingleConfig": "config",
    "InstancesConfig": "config",
    "EntitiesConfig": "config",
    "TrainConfig": "config",
    "InstanceTrainConfig": "config",
    "InstanceApplyConfig": "config",
    "label_folder": "runfolder.label",
    "RunSummary": "runfolder.record",
    "read_run": "runfolder.layout",
    "build_backbone": "features.backbone",
    "distil": "head.train",
    "distil_instances": "head.instance_train",
    "apply_head": "head.apply",
    "self_train_folder": "selftrain",
    "evaluate_run": "evaluate",
    "build_dataset": "review.dataset",
    "export_dataset": "review.export",
    "selfment_model": "review.model",
    "SelfmentError": "errors",
}

__all__ = [
    "__version__",
    "RunConfig",
    "SingleConfig",
    "InstancesConfig",
    "EntitiesConfig",
    "TrainConfig",
    "InstanceTrainConfig",
    "InstanceApplyConfig",
    "label_folder",
    "RunSummary",
    "read_run",
    "build_backbone",
    "distil",
    "distil_instances",
    "apply_head",
    "self_train_folder",
    "evaluate_run",
    "build_dataset",
    "export_dataset",
    "selfment_model",
    "SelfmentError",
]

if TYPE_CHECKING:
    from .config import (
        EntitiesConfig,
        InstanceApplyConfig,
        InstancesConfig,
        InstanceTrainConfig,
        RunConfig,
        SingleConfig,
        TrainConfig,
    )
    from .errors import SelfmentError
    from .evaluate import evaluate_run
    from .features.backbone import build_backbone
    from .head.apply import apply_head
    from .head.instance_train import distil_instances
    from .head.train import distil
    from .review.dataset import build_dataset
    from .review.export import export_dataset
    from .review.model import selfment_model
    from .runfolder.label import label_folder
    from .runfolder.layout import read_run
    from .runfolder.record import RunSummary


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
