"""Logit-space upsampling of patch scores and the agreement score of single-object masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfment_label.masks import THRESHOLD, highest_layer, upsample_scores
from selfment_label.segment import single
from selfment_label.segment.scores import agreement_score, border_fraction, centre_start
from selfment_label.segment.single import NcutIpo
from selfment_label.timing import StageTimer


def test_upsampling_interpolates_margins_not_saturated_probabilities() -> None:
    # two patches side by side, margins +3 and -1: the boundary lies where the linear
    # interpolation of the margin crosses zero, 3/4 of the way from the first centre
    margins = torch.tensor([[3.0, -1.0]])
    up = upsample_scores(torch.sigmoid(margins), (1, 80))
    centres = torch.arange(80) + 0.5
    inside = up[0] > THRESHOLD
    first_centre, second_centre = 20.0, 60.0
    crossing = first_centre + 0.75 * (second_centre - first_centre)
    assert torch.equal(inside, centres < crossing)
    # interpolating the probabilities (0.95 -> 0.27) instead would cut at pixel 46.5
    assert inside[40:50].all()


def test_hard_labels_step_half_way_and_stay_in_range() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    up = upsample_scores(labels, (4, 40))
    assert up.min() >= 0.0 and up.max() <= 1.0
    assert torch.equal(up > THRESHOLD, (torch.arange(40) < 20).expand(4, 40))
    batched = upsample_scores(torch.stack([labels, 1 - labels]), (4, 40))
    assert batched.shape == (2, 4, 40)
    assert torch.allclose(batched[0], up)


def test_agreement_score_hand_computed() -> None:
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True  # 4 interior patches
    assert agreement_score(mask, mask.clone(), mask.clone()).tolist() == [1.0]
    grown = mask.clone()
    grown[0, 0, 1:3] = True  # 2 more patches, both on the border row
    # mask = grown: IoU with the cut 4/6, with the centre start's result 1; the border has 12
    # patches, 2 of them inside -> x (1 - 2/12)
    expected = (4 / 6 + 1) / 2 * (1 - 2 / 12)
    assert torch.allclose(agreement_score(grown, mask, grown), torch.tensor([expected]))
    # the raw cut kept as the mask (--ipo-iters 0) still has to agree with the blind start
    assert torch.allclose(agreement_score(mask, mask, ~mask), torch.tensor([0.5]))
    assert agreement_score(mask, ~mask, ~mask).tolist() == [0.0]


def test_centre_start_is_the_central_half() -> None:
    box = centre_start(2, (8, 6), torch.device("cpu")).reshape(2, 8, 6)
    assert torch.equal(box[0], box[1])
    assert box[0, 2:6, 1:5].all() and int(box[0].sum()) == 16


def test_border_fraction_counts_each_border_patch_once() -> None:
    labels = torch.zeros(1, 4, 5, dtype=torch.bool)
    labels[0, 0, :] = True  # top row: 5 of the 14 border patches
    labels[0, 1:3, 1:4] = True  # interior: not counted
    assert torch.allclose(border_fraction(labels), torch.tensor([5 / 14]))


def test_ncut_ipo_swaps_a_mask_that_holds_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    # planted features: a 4x4 object in a 10x10 frame; the cut is forced onto the frame (as a
    # wrong seed does on real images), IPO keeps it, and the border rule swaps it back
    torch.manual_seed(0)
    rows = cols = 10
    inside = torch.zeros(rows, cols, dtype=torch.bool)
    inside[3:7, 3:7] = True
    tokens = torch.eye(16)[inside.long().flatten()] * 4 + 0.1 * torch.randn(rows * cols, 16)
    tokens = tokens.reshape(1, rows, cols, 16)

    def frame_cut(flat: torch.Tensor, grid: tuple[int, int], tau: float) -> tuple:
        return (~inside)[None], SimpleNamespace(converged=torch.tensor([True]))

    monkeypatch.setattr(single, "normalized_cut", frame_cut)
    ((swapped,),) = NcutIpo()(tokens, StageTimer())
    assert torch.equal(swapped.scores > THRESHOLD, inside)
    # IPO confirmed the (swapped) cut, a start from the centre finds it too, no border
    assert swapped.score == pytest.approx(1.0)
    ((kept,),) = NcutIpo(border_prior=False)(tokens, StageTimer())
    assert torch.equal(kept.scores > THRESHOLD, ~inside)
    assert kept.score == 0.0  # the whole border is in the mask


@pytest.mark.parametrize("layers", [1, 2, 3, 5])
def test_highest_layer_is_argmax_with_the_first_layer_on_ties(layers: int) -> None:
    generator = torch.Generator().manual_seed(layers)
    scores = torch.rand(layers, 37, 53, generator=generator)
    scores[:, :6, :6] = 0.5  # every layer tied: the first wins
    scores[-1, 10:12, :] = scores[0, 10:12, :]  # the last tied with the first: the first wins
    assert torch.equal(highest_layer(scores).long(), scores.argmax(0))
