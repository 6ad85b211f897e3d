"""selfment-label: object masks for a folder of images with no labels and no supervised model.

Self-supervised ViT patch features -> Normalized Cut -> Iterative Patch Optimization ->
COCO annotations with RLE masks.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("selfment-label")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
