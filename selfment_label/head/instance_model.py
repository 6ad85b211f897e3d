"""The instance head: a query-based, class-agnostic mask decoder on frozen patch tokens.

DETR / Mask2Former in small: the tokens are projected to ``hidden`` and given Fourier
features of their (row, column) position on the grid (any grid size); learned queries go
through ``layers`` decoder layers (self-attention among queries, cross-attention to the
patches); each query gives an objectness logit and a mask embedding, and its mask logits are
the embedding's dot product with per-patch mask features. Training matches queries to an
image's pseudo-masks with the Hungarian algorithm on a BCE + Dice + objectness cost, then
applies BCE + Dice to the matched masks and a binary objectness loss to every query
(unmatched ones down-weighted, and not punished at all when their mask overlaps no
pseudo-mask: CutLER's DropLoss, so the head may find objects the pseudo-labels missed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from ..config import InstanceApplyConfig, InstanceTrainConfig
from ..masks import THRESHOLD
from ..segment.scores import mask_iou

FOURIER_BANDS = 8
PART_INSIDE = 0.5
"""A predicted part belongs to the kept object that holds at least this share of it."""
PART_OF_WHOLE = 0.9
"""A part whose IoU with its object is above this is the object again, and is dropped."""
THREADS = 1
"""CPU threads of the instance head (training and inference): its kernels are small, and with
two threads on a crowded 2-core machine a training step took 10-20x longer than with one
(0.5-1.0 s against 0.05 s for a 32 x 24 grid)."""


def grid_positions(rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[rows * cols, 4 * FOURIER_BANDS]`` Fourier features of patch centres in [0, 1]."""
    y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    bands = math.pi * 2.0 ** torch.arange(FOURIER_BANDS, device=device, dtype=torch.float32)
    angles = torch.cat([yy.reshape(-1, 1) * bands, xx.reshape(-1, 1) * bands], dim=1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class InstanceHead(nn.Module):
    """Predicts ``queries`` scored masks per image from ``[B, rows, cols, D]`` patch tokens.

    Arguments:
      dim: backbone token dimension.
      hidden: decoder width.
      queries: number of learned queries.
      layers: decoder layers.
      heads: attention heads.
      part_queries: learned queries of a second set that predicts parts of the first set's
        masks (0: none; an ``entities`` run's parts are learnt by it).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        queries: int = 50,
        layers: int = 2,
        heads: int = 4,
        part_queries: int = 0,
    ):
        super().__init__()
        self.dim = dim
        self.project = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        self.position = nn.Linear(4 * FOURIER_BANDS, hidden)
        self.queries = nn.Embedding(queries, hidden)
        self.part_queries = nn.Embedding(part_queries, hidden) if part_queries else None
        layer = nn.TransformerDecoderLayer(
            hidden,
            heads,
            dim_feedforward=2 * hidden,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(hidden))
        self.objectness = nn.Linear(hidden, 1)
        self.mask_embed = _mlp(hidden)
        self.mask_features = _mlp(hidden)

    def config(self) -> dict[str, int]:
        """The constructor's arguments (recorded in the checkpoint)."""
        return {
            "dim": self.dim,
            "hidden": self.queries.embedding_dim,
            "queries": self.queries.num_embeddings,
            "layers": len(self.decoder.layers),
            "heads": self.decoder.layers[0].self_attn.num_heads,
            "part_queries": self.part_queries.num_embeddings if self.part_queries else 0,
        }

    @property
    def object_queries(self) -> int:
        """How many queries predict objects; the rest (``part_queries``) predict parts."""
        return self.queries.num_embeddings

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objectness logits [B, Q], mask logits [B, Q, rows, cols])``: the object queries
        first, then the part queries."""
        batch, rows, cols, _ = tokens.shape
        memory = self.project(tokens.reshape(batch, rows * cols, -1))
        memory = memory + self.position(grid_positions(rows, cols, tokens.device))
        queries = self.queries.weight
        if self.part_queries is not None:
            queries = torch.cat([queries, self.part_queries.weight])
        queries = queries.expand(batch, -1, -1)
        decoded = self.decoder(queries, memory)
        masks = torch.einsum("bqh,bnh->bqn", self.mask_embed(decoded), self.mask_features(memory))
        return self.objectness(decoded)[..., 0], masks.reshape(batch, -1, rows, cols)


@dataclass
class Prediction:
    """One image's predicted masks, best score first.

    Arguments:
      probabilities: ``[K, rows, cols]`` mask probabilities.
      scores: ``[K]`` scores: objectness x mean probability inside the mask.
    """

    probabilities: torch.Tensor
    scores: torch.Tensor


def query_scores(objectness: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Mask2Former's mask score: objectness probability x mean mask probability over the
    patches above 0.5 (0 for an empty mask).

    Arguments:
      objectness: ``[Q]`` logits.
      probabilities: ``[Q, rows, cols]`` mask probabilities.
    """
    flat = probabilities.flatten(1)
    inside = flat > THRESHOLD
    mean_inside = (flat * inside).sum(1) / inside.sum(1).clamp(min=1)
    return torch.sigmoid(objectness) * mean_inside


def _ranked(objectness: torch.Tensor, probabilities: torch.Tensor) -> Prediction:
    scores = query_scores(objectness, probabilities)
    order = scores.argsort(descending=True, stable=True)
    return Prediction(probabilities[order], scores[order])


def level_predictions(
    head: InstanceHead, tokens: torch.Tensor
) -> list[tuple[Prediction, Prediction]]:
    """Every object query's and every part query's mask and score for each image of a
    ``[B, rows, cols, D]`` batch (each set best score first, nothing filtered; the part set
    is empty for a head without part queries)."""
    objectness, logits = head(tokens.float())
    probabilities = torch.sigmoid(logits)
    split = head.object_queries
    return [
        (_ranked(image[:split], masks[:split]), _ranked(image[split:], masks[split:]))
        for image, masks in zip(objectness, probabilities, strict=True)
    ]


def raw_predictions(head: InstanceHead, tokens: torch.Tensor) -> list[Prediction]:
    """Every object query's mask and score for each image of a ``[B, rows, cols, D]`` batch
    (best score first, nothing filtered)."""
    return [objects for objects, _ in level_predictions(head, tokens)]


def select_instances(prediction: Prediction, config: InstanceApplyConfig) -> Prediction:
    """Masks to write for one image: scored at least ``min_score``, not empty, mask-level
    NMS, at most ``max_instances``, then painted in score order (a patch that a better mask
    holds above 0.5 is capped at ``1 - its probability`` in every later mask, so no later
    mask can take it) and masks left empty dropped.

    Arguments:
      prediction: every query's mask, best score first.
      config: the selection options.

    Returns:
      The kept masks, best score first.
    """
    kept: list[int] = []
    binary = (prediction.probabilities > THRESHOLD).flatten(1)
    for index, score in enumerate(prediction.scores.tolist()):
        if len(kept) >= config.max_instances or score < config.min_score:
            break
        if not bool(binary[index].any()):
            continue
        if kept and float(mask_iou(binary[index][None], binary[kept]).max()) > config.nms_iou:
            continue
        kept.append(index)
    painted, scores = [], []
    claimed = prediction.probabilities.new_zeros(prediction.probabilities.shape[1:])
    for index in kept:
        probability = torch.minimum(prediction.probabilities[index], 1.0 - claimed)
        if bool((probability > THRESHOLD).any()):
            painted.append(probability)
            scores.append(prediction.scores[index])
            claimed = torch.maximum(claimed, probability)
    if not painted:
        empty = prediction.probabilities[:0]
        return Prediction(empty, prediction.scores[:0])
    return Prediction(torch.stack(painted), torch.stack(scores))


def select_parts(
    objects: Prediction, parts: Prediction, config: InstanceApplyConfig
) -> list[tuple[int, Prediction]]:
    """Parts to write inside the kept objects.

    Each part query (``min_score`` and the object selection's rules apply) goes to the kept
    object that holds the largest share of it, when that share is at least
    ``PART_INSIDE``; it is clipped to that object (its probability capped by the object's),
    and dropped when it is the whole object again (IoU with it above ``PART_OF_WHOLE``).
    Each object's parts then go through ``select_instances`` (NMS, cap, painted disjoint).

    Arguments:
      objects: the kept objects (``select_instances``), best score first.
      parts: every part query's mask, best score first.
      config: the selection options.

    Returns:
      ``(index of the object among ``objects``, its parts)`` for every object with parts.
    """
    wanted = parts.scores >= config.min_score
    probabilities, scores = parts.probabilities[wanted], parts.scores[wanted]
    if not len(objects.scores) or not len(scores):
        return []
    holders = (objects.probabilities > THRESHOLD).flatten(1)
    binary = (probabilities > THRESHOLD).flatten(1)
    share = (binary.float() @ holders.float().T) / binary.sum(1, keepdim=True).clamp(min=1)
    best_share, parent = share.max(1)
    found = []
    for index, holder in enumerate(holders):
        mine = (parent == index) & (best_share >= PART_INSIDE)
        clipped = torch.minimum(probabilities[mine], objects.probabilities[index])
        inside = (clipped > THRESHOLD).flatten(1)
        keep = inside.any(1) & (mask_iou(inside, holder[None]) <= PART_OF_WHOLE)
        chosen = select_instances(Prediction(clipped[keep], scores[mine][keep]), config)
        if len(chosen.scores):
            found.append((index, chosen))
    return found


def _pair_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, K]`` mean per-patch BCE of every query's logits against every target."""
    positive = F.softplus(-logits)
    negative = F.softplus(logits)
    return (positive @ targets.T + negative @ (1.0 - targets).T) / logits.shape[1]


def _pair_dice(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, K]`` soft Dice loss of every query's probabilities against every target."""
    inter = probabilities @ targets.T
    total = probabilities.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)


def hungarian_match(
    objectness: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment of queries to targets on BCE + Dice + objectness cost.

    Arguments:
      objectness: ``[Q]`` logits.
      logits: ``[Q, N]`` mask logits.
      targets: ``[K, N]`` targets in [0, 1] (K <= Q).

    Returns:
      ``(query indices, target indices)``, each ``[min(Q, K)]``.
    """
    with torch.no_grad():
        cost = (
            _pair_bce(logits, targets)
            + _pair_dice(torch.sigmoid(logits), targets)
            - torch.sigmoid(objectness)[:, None]
        )
        # a diverged prediction costs the most; the non-finite loss then stops the training
        cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def image_losses(
    objectness: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    config: InstanceTrainConfig,
) -> dict[str, torch.Tensor]:
    """The loss terms of one image.

    Arguments:
      objectness: ``[Q]`` logits.
      logits: ``[Q, rows, cols]`` mask logits.
      targets: ``[K, rows, cols]`` pseudo-masks (patch area fractions; K may be 0; only the
        first Q are learnt when K > Q).
      config: loss weights.

    Returns:
      ``bce`` and ``dice`` over the matched masks (0 without targets), ``objectness``.
    """
    flat = logits.flatten(1)
    wanted = targets.flatten(1)[: len(flat)]
    labels = torch.zeros_like(objectness)
    weights = torch.full_like(objectness, config.no_object_weight)
    bce = dice = flat.sum() * 0.0
    if len(wanted):
        queries, matched = hungarian_match(objectness, flat, wanted)
        labels[queries] = 1.0
        weights[queries] = 1.0
        pairs = flat[queries]
        goal = wanted[matched]
        bce = F.binary_cross_entropy_with_logits(pairs, goal)
        dice = torch.diagonal(_pair_dice(torch.sigmoid(pairs), goal)).mean()
        if config.drop_loss_iou > 0:
            with torch.no_grad():
                predicted = flat > 0
                overlap = mask_iou(predicted[:, None], (wanted > THRESHOLD)[None]).max(1).values
                weights[(labels == 0) & (overlap < config.drop_loss_iou)] = 0.0
    object_loss = F.binary_cross_entropy_with_logits(
        objectness, labels, weight=weights, reduction="sum"
    )
    object_loss = object_loss / weights.sum().clamp(min=1.0)
    return {"bce": bce, "dice": dice, "objectness": object_loss}
