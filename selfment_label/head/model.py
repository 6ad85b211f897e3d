"""The distilled head: Linear(D,128)-ReLU-Linear(128,128) then Linear(128,2), and its losses.

It is trained on a run folder's masks: each image's union of masks gives, per patch of the
backbone's grid, the fraction of the patch's area inside the mask. The loss is BCE on
the foreground logit ``l1 - l0`` + Dice on its sigmoid (= softmax[:,1], the probability
inference thresholds at 0.5) + 0.1 x a supervised contrastive loss over (a subsample of)
the patch embeddings, temperature 0.05.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..config import TrainConfig
from ..masks import THRESHOLD

HIDDEN = 128


class PatchHead(nn.Module):
    """Per-patch foreground classifier with an embedding for the contrastive loss.

    Arguments:
      dim: backbone token dimension.
      hidden: embedding width.
    """

    def __init__(self, dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.classify = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [..., 2], embeddings [..., hidden])`` of ``[..., D]`` tokens."""
        embeddings = self.embed(tokens)
        return self.classify(embeddings), embeddings

    def foreground_logit(self, tokens: torch.Tensor) -> torch.Tensor:
        """Foreground logit ``l1 - l0`` of ``[..., D]`` tokens (its sigmoid is softmax[..., 1])."""
        logits, _ = self(tokens)
        return logits[..., 1] - logits[..., 0]

    def foreground(self, tokens: torch.Tensor) -> torch.Tensor:
        """Foreground probability softmax[..., 1] of ``[..., D]`` tokens."""
        return torch.sigmoid(self.foreground_logit(tokens))


def mask_score(probability: torch.Tensor) -> torch.Tensor:
    """Score of each image's mask: the mean foreground probability of its patches above 0.5
    (0 when there are none).

    Arguments:
      probability: ``[B, rows, cols]`` foreground probabilities.

    Returns:
      ``[B]`` scores.
    """
    inside = probability > THRESHOLD
    count = inside.flatten(1).sum(1)
    total = (probability * inside).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def patch_targets(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch's area that lies inside a full-size mask.

    Arguments:
      mask: ``[H, W]`` boolean mask at the image's displayed size.
      grid: ``(rows, cols)`` patch grid of the image.

    Returns:
      ``[rows, cols]`` float32 fractions in [0, 1].
    """
    full = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(full, grid)[0, 0]


def dice_loss(probability: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per image, averaged over images.

    Arguments:
      probability: ``[N]`` foreground probabilities of all patches of a batch.
      target: ``[N]`` targets in [0, 1].
      index: ``[N]`` image index of each patch (0..B-1).
    """
    n_images = int(index.max()) + 1
    inter = torch.zeros(n_images).index_add(0, index, probability * target)
    total = torch.zeros(n_images).index_add(0, index, probability + target)
    return (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).mean()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over patch embeddings.

    Arguments:
      embeddings: ``[N, E]`` embeddings (normalised here).
      labels: ``[N]`` boolean foreground labels; same label = positive pair.
      temperature: softmax temperature.

    Returns:
      The mean over anchors that have at least one positive (0 when none has).
    """
    unit = F.normalize(embeddings, dim=-1)
    logits = unit @ unit.T / temperature
    self_mask = torch.eye(len(unit), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return embeddings.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / counts[anchors]
    return -mean_log_prob.mean()


def head_losses(
    head: PatchHead,
    tokens: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch.

    Arguments:
      head: the head being trained.
      tokens: ``[N, D]`` tokens of all patches of the batch's images.
      target: ``[N]`` patch targets in [0, 1].
      index: ``[N]`` image index of each patch.
      config: training options (loss weights, temperature, subsample size).
      generator: draws the contrastive subsample.

    Returns:
      ``bce``, ``dice``, ``contrastive`` and their weighted sum ``total``.
    """
    logits, embeddings = head(tokens)
    # softmax[:, 1] == sigmoid(l1 - l0): BCE, Dice and inference all see the same probability
    foreground_logit = logits[:, 1] - logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(foreground_logit, target)
    dice = dice_loss(torch.sigmoid(foreground_logit), target, index)
    take = torch.randperm(len(tokens), generator=generator)[: config.contrastive_patches]
    contrastive = supervised_contrastive_loss(
        embeddings[take], target[take] > THRESHOLD, config.temperature
    )
    total = bce + dice + config.contrastive_weight * contrastive
    return {"bce": bce, "dice": dice, "contrastive": contrastive, "total": total}
