"""``selfment_label.evaluate`` and ``selfment-label eval`` on small hand-computed cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.evaluate import (
    EvalError,
    evaluate_run,
    load_gt_mask,
    load_predictions,
    match,
    per_image_csv,
)
from selfment_label.masks import annotation_record
from selfment_label.runfolder.coco import write_coco_stream
from selfment_label.runfolder.layout import RunFolderError

TOP_LEFT = np.zeros((4, 4), dtype=bool)
TOP_LEFT[:2, :2] = True
TOP_HALF = np.zeros((4, 4), dtype=bool)
TOP_HALF[:2, :] = True


def write_run(run_dir: Path, images: dict[str, np.ndarray | None], score_maps=None) -> Path:
    """A run folder whose images carry the given masks (None: labelled, no annotation)."""
    records = []
    for name, mask in images.items():
        record = {"file_name": name, "width": 4, "height": 4, "annotations": []}
        if mask is not None:
            record["annotations"].append(annotation_record(mask, 0.9))
        if score_maps and name in score_maps:
            rel = f"scores/{name}.png"
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(score_maps[name]).save(run_dir / rel)
            record["score_map"] = rel
        records.append(record)
    write_coco_stream(run_dir / "annotations.json", records)
    return run_dir


def write_gt(gt_dir: Path, masks: dict[str, np.ndarray]) -> Path:
    """8-bit 0/255 GT PNGs."""
    for name, mask in masks.items():
        path = gt_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return gt_dir


def row_of(report, name: str) -> dict[str, float]:
    return next(r for r in report.rows if r.name == name).metrics


def test_hand_computed_partial_overlap(tmp_path: Path) -> None:
    # GT: 4 px top-left; prediction: 8 px top half -> tp 4, fp 4, fn 0, tn 8
    run = write_run(tmp_path / "run", {"a.jpg": TOP_HALF})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT})
    report = evaluate_run(run, gt)
    m = report.metrics
    assert m["iou"] == pytest.approx(4 / 8)
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["mae"] == pytest.approx(4 / 16)
    # P 0.5, R 1 at every threshold >= 1/255; at threshold 0 P = 4/16
    f_half = 1.3 * 0.5 * 1.0 / (0.3 * 0.5 + 1.0)
    f_zero = 1.3 * 0.25 * 1.0 / (0.3 * 0.25 + 1.0)
    assert m["max_f"] == pytest.approx(f_half)
    assert m["mean_f"] == pytest.approx((255 * f_half + f_zero) / 256)
    assert m["adaptive_f"] == pytest.approx(f_half)  # threshold 2 * mean = 1 keeps the mask
    assert report.evaluated == 1
    assert report.rows[0].source == "masks"


def test_edge_cases_empty_gt_empty_prediction_all_foreground(tmp_path: Path) -> None:
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    run = write_run(tmp_path / "run", {"empty.jpg": None, "full.jpg": full, "missed.jpg": None})
    gt = write_gt(tmp_path / "gt", {"empty.png": empty, "full.png": full, "missed.png": TOP_LEFT})
    report = evaluate_run(run, gt)

    both_empty = row_of(report, "empty")
    assert both_empty["accuracy"] == 1.0
    assert both_empty["mae"] == 0.0
    assert both_empty["s_measure"] == 1.0  # empty GT: S = 1 - mean(prediction)
    assert both_empty["iou"] == 0.0  # pysodmetrics convention: 0/0 -> 0
    assert both_empty["weighted_f"] == 0.0  # pysodmetrics: no GT foreground -> 0

    all_fg = row_of(report, "full")
    assert all_fg["iou"] == 1.0
    assert all_fg["accuracy"] == 1.0
    assert all_fg["mae"] == 0.0
    assert all_fg["s_measure"] == 1.0  # full GT: S = mean(prediction)
    assert all_fg["max_f"] == pytest.approx(1.0)

    empty_prediction = row_of(report, "missed")
    assert empty_prediction["iou"] == 0.0
    assert empty_prediction["accuracy"] == pytest.approx(12 / 16)
    assert empty_prediction["mae"] == pytest.approx(4 / 16)
    # threshold 0 takes every pixel (P = 4/16, R = 1); every higher threshold takes none
    assert empty_prediction["max_f"] == pytest.approx(1.3 * 0.25 / (0.3 * 0.25 + 1.0))

    assert report.metrics["iou"] == pytest.approx((0.0 + 1.0 + 0.0) / 3)
    assert report.metrics["accuracy"] == pytest.approx((1.0 + 1.0 + 0.75) / 3)
    assert report.metrics["mae"] == pytest.approx((0 + 0 + 0.25) / 3)


def test_missing_and_unmatched_are_counted_not_dropped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a.jpg": TOP_LEFT, "extra.jpg": TOP_LEFT})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT, "b.png": TOP_LEFT})
    report = evaluate_run(run, gt)
    assert report.evaluated == 2
    assert report.gt_without_prediction == ["b.png"]
    assert report.predictions_without_gt == ["extra.jpg"]
    assert row_of(report, "b")["iou"] == 0.0
    assert report.metrics["iou"] == pytest.approx(0.5)  # 1.0 for a, 0.0 for the empty b


def test_size_mismatch_is_an_error_for_that_image(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a.jpg": TOP_LEFT, "b.jpg": TOP_LEFT})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT, "b.png": np.ones((5, 4), dtype=bool)})
    report = evaluate_run(run, gt)
    assert report.evaluated == 1
    assert "size mismatch" in report.errors["b.png"]
    assert report.metrics["iou"] == 1.0


def test_score_map_is_used_when_saved(tmp_path: Path) -> None:
    soft = np.zeros((4, 4), dtype=np.uint8)
    soft[:2, :2] = 230  # 0.90: above 0.5
    soft[2:, :] = 120  # 0.47: below 0.5, but counts in MAE and in the threshold sweep
    run = write_run(tmp_path / "run", {"a.jpg": TOP_HALF}, score_maps={"a.jpg": soft})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT})
    report = evaluate_run(run, gt)
    assert report.rows[0].source == "score_map"
    assert report.metrics["iou"] == 1.0
    expected_mae = (4 * (1 - 230 / 255) + 8 * 120 / 255) / 16
    assert report.metrics["mae"] == pytest.approx(expected_mae)
    binary = evaluate_run(run, gt, use_score_maps=False)
    assert binary.rows[0].source == "masks"
    assert binary.metrics["iou"] == pytest.approx(0.5)


def test_gt_modes_threshold_at_127(tmp_path: Path) -> None:
    gray = np.array([[0, 127], [128, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(gray > 127).convert("1").save(tmp_path / "one.png")
    expected = np.array([[False, False], [True, True]])
    for name in ("l.png", "rgb.png", "one.png"):
        assert np.array_equal(load_gt_mask(tmp_path / name), expected), name


def test_match_by_relative_path_then_stem(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "run",
        {"cats/x.jpg": TOP_LEFT, "dogs/x.jpg": TOP_LEFT, "deep/y.jpg": TOP_LEFT},
    )
    pairs, unmatched = match(load_predictions(run), ["cats/x.png", "y.png", "z.png"])
    found = {gt: p.file_name if p else None for gt, p in pairs}
    assert found == {"cats/x.png": "cats/x.jpg", "y.png": "deep/y.jpg", "z.png": None}
    assert unmatched == ["dogs/x.jpg"]


def test_masks_export_names_match_when_images_differ_only_by_extension(tmp_path: Path) -> None:
    """Issue 22, item 6: ``a.jpg.png`` is a.jpg's mask, ``a.png.png`` a.png's; nothing dropped."""
    run = write_run(tmp_path / "run", {"a.jpg": TOP_LEFT, "a.png": TOP_HALF, "b.jpg": TOP_LEFT})
    masks = {"a.jpg.png": TOP_LEFT, "a.png.png": TOP_HALF, "b.png": TOP_LEFT}
    gt = write_gt(tmp_path / "gt", masks)
    report = evaluate_run(run, gt)
    assert {r.gt_file: r.prediction for r in report.rows} == {
        "a.jpg.png": "a.jpg",
        "a.png.png": "a.png",
        "b.png": "b.jpg",
    }
    assert report.metrics["iou"] == 1.0 and not report.predictions_without_gt
    ambiguous = write_gt(tmp_path / "gt2", {"a.png": TOP_LEFT})
    report = evaluate_run(run, ambiguous)
    assert report.gt_without_prediction == ["a.png"]
    assert report.predictions_without_gt == ["a.jpg", "a.png", "b.jpg"]


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT})
    with pytest.raises(RunFolderError, match="annotations.json not found"):
        evaluate_run(tmp_path / "nope", gt)
    run = write_run(tmp_path / "run", {"a.jpg": TOP_LEFT})
    with pytest.raises(EvalError, match="ground-truth folder not found"):
        evaluate_run(run, tmp_path / "missing")
    (tmp_path / "emptygt").mkdir()
    with pytest.raises(EvalError, match="no ground-truth mask images"):
        evaluate_run(run, tmp_path / "emptygt")


def test_cli_json_and_per_image_csv(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a.jpg": TOP_HALF, "b.jpg": TOP_LEFT})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT, "b.png": TOP_LEFT, "c.png": TOP_LEFT})
    csv_path = tmp_path / "out" / "per_image.csv"
    result = CliRunner().invoke(
        app, ["eval", str(run), "--gt", str(gt), "--json", "--per-image", str(csv_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["images_evaluated"] == 3
    assert summary["gt_without_prediction"] == 1
    assert summary["metrics"]["iou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert float(rows[0]["iou"]) == pytest.approx(0.5)
    assert rows[2]["source"] == "empty"
    assert csv_path.read_text() == per_image_csv(evaluate_run(run, gt))


def test_cli_table_and_error_exit(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"a.jpg": TOP_LEFT})
    gt = write_gt(tmp_path / "gt", {"a.png": TOP_LEFT})
    result = CliRunner().invoke(app, ["eval", str(run), "--gt", str(gt)])
    assert result.exit_code == 0, result.output
    assert "maxF" in result.output and "1.0000" in result.output
    missing = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--gt", str(gt)])
    assert missing.exit_code == 1
    assert "annotations.json not found" in missing.output
