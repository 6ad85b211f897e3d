"""The backbone in bf16 on a CPU: its fastest form measured (docs/speed-report.md).

The weights are cast to bf16 once and the input follows, so no matrix product recasts its
weights on every call (what ``torch.autocast`` does on a CPU). Each ``nn.Linear`` then runs
as oneDNN's linear with the bias added inside the product, and the MLP's GELU fused in:
torch's plain bf16 ``addmm`` adds the bias in a separate slow pass, which cost as much as
the product itself at ViT-S/14 sizes. The fused op (``torch.ops.mkldnn._linear_pointwise``,
the one ``torch.compile`` emits on CPUs) is checked once against ``F.linear``; where it is
missing or wrong the plain bf16 linear is used. Attention stays on timm's SDPA path.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GELU_ALGORITHMS = {"none": "none", "tanh": "tanh"}
"""``nn.GELU.approximate`` -> oneDNN's GELU algorithm name."""


def _linear_pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None
) -> torch.Tensor:
    attr, algorithm = ("gelu", gelu) if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


@functools.cache
def fused_linear_available() -> bool:
    """Whether oneDNN's fused bf16 linear exists here and agrees with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (
        torch.randn(shape, generator=generator).to(torch.bfloat16)
        for shape in ((2, 5, 32), (24, 32), (24,))
    )
    try:
        with torch.inference_mode():
            plain = F.linear(x, weight, bias).float()
            pairs = [
                (_linear_pointwise(x, weight, bias, None).float(), plain),
                (_linear_pointwise(x, weight, bias, "none").float(), F.gelu(plain)),
            ]
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        logger.info("oneDNN fused linear unavailable (%s); plain bf16 linear used", error)
        return False
    agrees = all(torch.allclose(a, b, atol=0.1, rtol=0.05) for a, b in pairs)
    if not agrees:
        logger.info("oneDNN fused linear disagrees with F.linear; plain bf16 linear used")
    return agrees


class FusedLinear(nn.Module):
    """A bf16 ``nn.Linear`` (optionally followed by GELU) as one oneDNN op.

    Arguments:
      linear: the layer whose (already bf16) weight and bias it uses.
      gelu: oneDNN's GELU algorithm (``none``: exact, ``tanh``) to fuse, or None.
    """

    def __init__(self, linear: nn.Linear, gelu: str | None = None):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(x @ weight.T + bias)`` (GELU only when fused)."""
        return _linear_pointwise(x, self.weight, self.bias, self.gelu)


def _fuse_mlp_gelu(module: nn.Module) -> bool:
    """Fold a timm ``Mlp``'s GELU into its first linear; whether it did."""
    fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(act, nn.GELU):
        return False
    module.fc1 = FusedLinear(fc1, GELU_ALGORITHMS[act.approximate])
    module.act = nn.Identity()
    return True


def _fuse_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a ``FusedLinear``; how many."""
    fused = sum(_fuse_mlp_gelu(module) for module in list(model.modules()))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, FusedLinear(child))
                fused += 1
    return fused


def bf16_cpu_model(model: nn.Module) -> nn.Module:
    """A bf16 copy of a frozen CPU ``model`` in the fastest form measured; ``model`` is kept.

    Arguments:
      model: a timm ViT in eval mode, on the CPU.

    Returns:
      The copy, in eval mode: feed it bf16 inputs.
    """
    reduced = copy.deepcopy(model).to(torch.bfloat16).eval()
    if fused_linear_available():
        count = _fuse_linears(reduced)
        logger.debug("bf16 CPU backbone: %d linear layers fused with oneDNN", count)
    return reduced
