"""Edge refinement: full-size soft maps that follow the image's edges, not the patch grid.

The segmenters decide masks on the backbone's patch grid (14 px patches at 448 px: about
32 x 32 cells), so upsampled masks are smooth curves between patch centres. A refinement
filters the upsampled soft maps with an edge-aware filter guided by the image, which pulls
the 0.5 boundary onto the object's edges. Methods (``config.REFINE_METHODS``):

- ``guided``: the fast guided filter (He, Sun & Tang 2010; He & Sun 2015) of kornia, on torch,
  so it runs where the maps are (CPU or GPU);
- ``crf``: a fully connected CRF with Gaussian edge potentials (Kraehenbuehl & Koltun 2011)
  through pydensecrf2 (CPU only; the ``crf`` extra).

Both refine the maps of one group of disjoint siblings at once, as label layers: layer 0 the
background, then one layer per sibling (``masks.full_size_masks`` gives each pixel to the
highest layer, so refined siblings stay disjoint). Spatial parameters are in patches of the
guide image, so they mean the same at any image size and resolution; they were chosen on
ecssd-dev (``benchmarks/refine_ecssd.py``, "Edges" in docs/quality-report.md), where a patch
is about 12.5 px.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .config import REFINE_MAX_SIDE, REFINE_METHODS
from .errors import SelfmentError

GUIDED_RADIUS_PATCHES = 1.25
"""Window radius of the guided filter, in patches (16 px on ecssd-dev)."""
GUIDED_EPS = 1e-4
"""Regulariser of the guided filter, in squared guide units (RGB in [0, 1])."""
GUIDED_CELLS_PER_PATCH = 3
"""The fast guided filter's coefficients are computed on a grid of about this many cells per
patch (subsampling 4 on ecssd-dev), then upsampled."""
CRF_SXY_PATCHES = 4.0
"""Spatial reach of the CRF's appearance (bilateral) kernel, in patches (50 px on ecssd-dev)."""
CRF_SRGB = 5.0
"""Colour reach of the appearance kernel, in 8-bit RGB units."""
CRF_COMPAT = 5.0
"""Weight of the appearance kernel."""
CRF_SMOOTH_SXY = 3.0
"""Spatial reach of the CRF's smoothness kernel, in pixels."""
CRF_SMOOTH_COMPAT = 3.0
"""Weight of the smoothness kernel."""
CRF_ITERATIONS = 5
"""Mean-field iterations of the CRF."""
CRF_MIN_PROBABILITY = 1e-5
"""Probabilities are clipped to at least this before their negative log is the CRF's unary."""


class RefineUnavailable(SelfmentError, RuntimeError):
    """The refinement asked for needs a package that is not installed."""


def guide_side(method: str) -> int | None:
    """Longest side of the guide image a refinement needs (None when ``method`` is ``none``)."""
    return None if method == "none" else REFINE_MAX_SIDE


def check_available(method: str) -> None:
    """Fail early, before any work, when ``method`` cannot run here.

    Raises:
      ValueError: unknown method.
      RefineUnavailable: ``crf`` without pydensecrf2 (the message names the extra).
    """
    if method not in REFINE_METHODS:
        raise ValueError(f"refine must be one of {', '.join(REFINE_METHODS)}, not {method!r}")
    if method == "crf" and importlib.util.find_spec("pydensecrf") is None:
        raise RefineUnavailable(
            "refine crf needs pydensecrf2, which is not installed: "
            "pip install 'selfment-label[crf]'",
            remedy="refine",
        )


def guide_tensor(guide: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A uint8 ``[h, w, 3]`` RGB guide as a float ``[3, h, w]`` tensor in [0, 1] on ``device``."""
    return torch.from_numpy(guide).to(device).permute(2, 0, 1).float().div_(255.0)


def refine_layers(
    layers: torch.Tensor, guide: torch.Tensor, method: str, patch_pixels: float
) -> torch.Tensor:
    """Refine label layers with an edge-aware filter guided by the image.

    Arguments:
      layers: ``[L, h, w]`` probabilities at the guide's size, layer 0 the background and one
        layer per disjoint sibling mask.
      guide: ``[3, h, w]`` RGB in [0, 1], on the layers' device.
      method: ``none``, ``guided`` or ``crf``.
      patch_pixels: guide pixels per backbone patch (sets the filters' spatial reach).

    Returns:
      ``[L, h, w]`` refined layers in [0, 1], on the layers' device.
    """
    if method == "none":
        return layers
    if method == "guided":
        return _guided(layers, guide, patch_pixels)
    if method == "crf":
        return _crf(layers, guide, patch_pixels)
    raise ValueError(f"refine must be one of {', '.join(REFINE_METHODS)}, not {method!r}")


def _guided(layers: torch.Tensor, guide: torch.Tensor, patch_pixels: float) -> torch.Tensor:
    from kornia.filters import guided_blur

    radius = max(1, round(GUIDED_RADIUS_PATCHES * patch_pixels))
    subsample = max(1, round(patch_pixels / GUIDED_CELLS_PER_PATCH))
    refined = guided_blur(
        guide[None], layers[None].float(), 2 * radius + 1, GUIDED_EPS, subsample=subsample
    )
    return refined[0].clamp_(0.0, 1.0)


def _crf(layers: torch.Tensor, guide: torch.Tensor, patch_pixels: float) -> torch.Tensor:
    check_available("crf")
    import pydensecrf.densecrf as dcrf

    count, height, width = layers.shape
    probabilities = layers.float().clamp(min=CRF_MIN_PROBABILITY)
    probabilities = probabilities / probabilities.sum(0, keepdim=True)
    unary = -torch.log(probabilities).reshape(count, -1).cpu().numpy()
    image = (guide * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    crf = dcrf.DenseCRF2D(width, height, count)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=CRF_SMOOTH_SXY, compat=CRF_SMOOTH_COMPAT)
    crf.addPairwiseBilateral(
        sxy=CRF_SXY_PATCHES * patch_pixels,
        srgb=CRF_SRGB,
        rgbim=np.ascontiguousarray(image),
        compat=CRF_COMPAT,
    )
    marginals = np.asarray(crf.inference(CRF_ITERATIONS), dtype=np.float32)
    return torch.from_numpy(marginals.reshape(count, height, width)).to(layers.device)
