"""Self-correction: the previous round's model cleans the pseudo-masks it learnt from.

CutLER's self-training rounds, on the patch grid and the cached tokens (no backbone pass).
The teacher (the model as the last round left it) predicts every query's mask on each
training image; then, per image:

- **replace**: a pseudo-mask that a confident teacher mask (score >= ``keep_score``)
  matches (patch IoU >= ``match_iou``) is replaced by that teacher mask;
- **drop**: a pseudo-mask that no teacher mask scored >= ``drop_score`` matches is dropped
  (the model does not believe it is an object);
- **add**: a confident teacher mask that matches no pseudo-mask is added (an object the
  pseudo-labels missed), after mask-level NMS among the teacher's masks.

Each rule's count is recorded per round (``RoundChange``) in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..config import InstanceApplyConfig, InstanceTrainConfig
from ..masks import THRESHOLD
from ..segment.scores import mask_iou
from .instance_model import InstanceHead, Prediction, raw_predictions, select_instances

if TYPE_CHECKING:
    from .instance_train import InstanceImage


class CorrectionRules(Protocol):
    """The thresholds of a round (``InstanceTrainConfig``, or ``TrainConfig`` for the
    single-object head, which corrects its one target per image with the same rules)."""

    keep_score: float
    drop_score: float
    match_iou: float


@dataclass
class RoundChange:
    """What one round of self-correction did to the pseudo-masks (all zero for round 0).

    Arguments:
      replaced: pseudo-masks replaced by the teacher mask that matches them.
      dropped: pseudo-masks dropped (no teacher mask scored them high enough).
      added: teacher masks added as objects the pseudo-labels missed.
    """

    replaced: int = 0
    dropped: int = 0
    added: int = 0


def correct_image(
    targets: torch.Tensor, prediction: Prediction, config: CorrectionRules
) -> tuple[torch.Tensor, RoundChange]:
    """One image's corrected pseudo-masks.

    Arguments:
      targets: ``[K, rows, cols]`` current pseudo-masks (patch area fractions).
      prediction: the teacher's every query, best score first.
      config: ``keep_score``, ``drop_score``, ``match_iou``.

    Returns:
      ``([K', rows, cols] corrected pseudo-masks, what changed)``.
    """
    grid = prediction.probabilities.shape[-2:]
    teacher = (prediction.probabilities > THRESHOLD).flatten(1)
    scores = prediction.scores
    change = RoundChange()
    corrected: list[torch.Tensor] = []
    confident = scores >= config.keep_score
    for target in targets:
        iou = mask_iou((target > THRESHOLD).reshape(1, -1), teacher)
        matching = iou >= config.match_iou
        best_confident = torch.where(matching & confident, iou, -1.0)
        if float(best_confident.max()) >= 0:
            winner = int(best_confident.argmax())
            corrected.append(teacher[winner].reshape(grid).float())
            change.replaced += 1
        elif not bool((matching & (scores >= config.drop_score)).any()):
            change.dropped += 1
        else:
            corrected.append(target)
    candidates = select_instances(
        Prediction(prediction.probabilities[confident], scores[confident]),
        InstanceApplyConfig(
            max_instances=len(scores) or 1, min_score=config.keep_score, nms_iou=config.match_iou
        ),
    )
    for probability in candidates.probabilities:
        mask = (probability > THRESHOLD).reshape(1, -1)
        known = torch.stack([(t > THRESHOLD).reshape(-1) for t in corrected]) if corrected else None
        if known is None or float(mask_iou(mask, known).max()) < config.match_iou:
            corrected.append(mask.reshape(grid).float())
            change.added += 1
    stacked = torch.stack(corrected) if corrected else targets[:0]
    return stacked, change


@torch.inference_mode()
def correct_targets(
    head: InstanceHead,
    images: list[InstanceImage],
    config: InstanceTrainConfig,
    device: torch.device | str = "cpu",
) -> RoundChange:
    """Replace every image's targets by the teacher's corrections (in place).

    Arguments:
      head: the teacher (the model after the previous round).
      images: the training images; their ``targets`` are replaced.
      config: the round's thresholds.
      device: where the teacher runs.

    Returns:
      The summed changes over all images.
    """
    was_training = head.training
    head.eval()
    total = RoundChange()
    for image in images:
        prediction = raw_predictions(head, image.tokens.to(device)[None])[0]
        prediction = Prediction(prediction.probabilities.cpu(), prediction.scores.cpu())
        image.targets, change = correct_image(image.targets, prediction, config)
        total.replaced += change.replaced
        total.dropped += change.dropped
        total.added += change.added
    head.train(was_training)
    return total
