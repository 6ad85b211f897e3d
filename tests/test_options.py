"""Option validation, exit codes, and which errors become skips."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from helpers import tiny_config, write_noise
from rich.progress import Progress
from selfment_label_cli.console import LabelProgress, RateColumn
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label import engine
from selfment_label.config import (
    EntitiesConfig,
    InstanceApplyConfig,
    InstancesConfig,
    InstanceTrainConfig,
    RunConfig,
    SingleConfig,
    TrainConfig,
)
from selfment_label.device import DeviceError, resolve_device
from selfment_label.runfolder import label as labelling
from selfment_label.runfolder.label import label_folder

BAD_OPTIONS = [
    (RunConfig, {"resolution": 0}),
    (RunConfig, {"resolution": 14}),
    (RunConfig, {"resolution": 100_000}),
    (RunConfig, {"batch_size": 0}),
    (RunConfig, {"workers": 0}),
    (RunConfig, {"max_pixels": 0}),
    (RunConfig, {"precision": "fp8"}),
    (SingleConfig, {"tau": math.nan}),
    (SingleConfig, {"tau": 1.5}),
    (SingleConfig, {"tau": -1.0}),
    (SingleConfig, {"ipo_iters": -1}),
    (SingleConfig, {"temperature": 0.0}),
    (SingleConfig, {"border_prior": "yes"}),
    (InstancesConfig, {"max_instances": 0}),
    (InstancesConfig, {"min_area": 2.0}),
    (EntitiesConfig, {"merge_floor": math.nan}),
    (EntitiesConfig, {"persistence": -0.1}),
    (EntitiesConfig, {"min_area": -0.5}),
    (TrainConfig, {"epochs": 0}),
    (TrainConfig, {"lr": math.inf}),
    (TrainConfig, {"lr": -1e-3}),
    (TrainConfig, {"batch_size": 0}),
    (TrainConfig, {"temperature": 0.0}),
    (TrainConfig, {"target_threshold": 1.5}),
    (InstanceTrainConfig, {"queries": 0}),
    (InstanceTrainConfig, {"hidden": 130}),
    (InstanceTrainConfig, {"rounds": -1}),
    (InstanceTrainConfig, {"keep_score": 1.5}),
    (InstanceTrainConfig, {"match_iou": 0.0}),
    (InstanceApplyConfig, {"max_instances": 0}),
    (InstanceApplyConfig, {"min_score": math.nan}),
    (InstanceApplyConfig, {"nms_iou": -0.1}),
]


@pytest.mark.parametrize(("cls", "values"), BAD_OPTIONS)
def test_bad_option_values_are_refused_with_a_sentence(cls, values):
    name = next(iter(values))
    with pytest.raises(ValueError, match=name):
        cls(**values)


def test_defaults_are_valid():
    configs = (RunConfig, SingleConfig, InstancesConfig, EntitiesConfig, TrainConfig)
    for cls in (*configs, InstanceTrainConfig, InstanceApplyConfig):
        cls()


@pytest.fixture
def tiny_cli(monkeypatch, tiny_backbone):
    """The CLI in-process, building the tiny backbone instead of downloading one."""
    monkeypatch.setattr(labelling, "backbone_for", lambda config: tiny_backbone)
    return CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["--resolution", "0"],
        ["--tau", "nan"],
        ["--tau", "2"],
        ["--ipo-iters", "-3"],
        ["--max-pixels", "0"],
        ["--mode", "entities", "--merge-floor", "inf"],
    ],
)
def test_cli_bad_option_is_a_one_line_usage_error(tiny_cli, tmp_path, args):
    images = write_noise(tmp_path / "img", 2)
    result = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert "invalid option" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--min-area", "nan"], "min_area must be a finite number, not nan"),
        (["--mode", "entities", "--persistence", "nan"], "persistence must be a finite number"),
        (["--min-area", "2"], "min_area must be in [0.0, 1.0], not 2.0"),
    ],
)
def test_a_nan_option_is_named_not_a_number(tiny_cli, tmp_path, args, sentence):
    images = write_noise(tmp_path / "img", 2)
    mode = [] if "--mode" in args else ["--mode", "instances"]
    result = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o"), *mode, *args])
    assert result.exit_code == 2, result.output
    assert sentence in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--max-instances", "5"], "--max-instances is an option of --mode instances, not of"),
        (["--mode", "entities", "--tau", "0.3"], "--tau is an option of --mode single or --mode"),
        (["--merge-floor", "0.5"], "--merge-floor is an option of --mode entities"),
        (["--mode", "entities", "--no-border-prior"], "--border-prior is an option of"),
    ],
)
def test_options_of_another_mode_are_refused(tiny_cli, tmp_path, args, sentence):
    images = write_noise(tmp_path / "img", 2)
    result = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert sentence in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_options_of_the_chosen_mode_are_taken(tiny_cli, tmp_path):
    images = write_noise(tmp_path / "img", 2)
    args = ["--mode", "instances", "--max-instances", "2", "--min-area", "0.05", "--tau", "0.3"]
    out = tmp_path / "o"
    result = tiny_cli.invoke(
        app, ["run", str(images), "--out", str(out), "--resolution", "112", *args]
    )
    assert result.exit_code == 0, result.output
    options = json.loads((out / "run.json").read_text())["options"]
    assert (options["max_instances"], options["min_area"], options["tau"]) == (2, 0.05, 0.3)


def test_images_over_the_pixel_limit_are_skipped_with_the_flag_to_raise_it(tiny_cli, tmp_path):
    """The skip reason (run.json) states the limit; the CLI's summary names --max-pixels."""
    images = write_noise(tmp_path / "img", 2)
    out = tmp_path / "o"
    result = tiny_cli.invoke(app, ["run", str(images), "--out", str(out), "--max-pixels", "100"])
    assert result.exit_code == 3, result.output
    reasons = json.loads((out / "run.json").read_text())["images_skipped"].values()
    assert all(r.endswith("(max_pixels)") and "--" not in r for r in reasons)
    assert "raise the limit with --max-pixels" in " ".join(result.output.split())


def test_run_that_labels_nothing_exits_3(tiny_cli, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "fake.png").write_bytes(b"not an image at all")
    (images / "zero.jpg").write_bytes(b"")
    result = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3, result.output
    assert "nothing was labelled" in result.output


def test_run_that_labels_something_exits_0(tiny_cli, tmp_path):
    images = write_noise(tmp_path / "img", 2)
    (images / "fake.png").write_bytes(b"not an image at all")
    args = ["run", str(images), "--out", str(tmp_path / "o"), "--resolution", "112"]
    result = tiny_cli.invoke(app, args)
    assert result.exit_code == 0, result.output


def test_programming_errors_in_decoding_propagate(monkeypatch, tmp_path, tiny_backbone):
    def broken(*args, **kwargs):
        raise TypeError("a bug, not a bad image")

    monkeypatch.setattr(engine, "prepare_image", broken)
    images = write_noise(tmp_path / "img", 2)
    with pytest.raises(TypeError, match="a bug"):
        label_folder(images, tmp_path / "o", tiny_config(), backbone=tiny_backbone)


def test_cli_shows_traceback_of_a_bug_only_with_verbose(monkeypatch, tiny_cli, tmp_path):
    def broken(*args, **kwargs):
        raise TypeError("a bug, not a bad image")

    monkeypatch.setattr(engine, "prepare_image", broken)
    images = write_noise(tmp_path / "img", 2)
    quiet = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o")])
    assert quiet.exit_code == 1
    assert "unexpected TypeError" in quiet.output and "-v" in quiet.output
    assert "Traceback" not in quiet.output
    loud = tiny_cli.invoke(app, ["run", str(images), "--out", str(tmp_path / "o2"), "-v"])
    assert loud.exit_code == 1
    assert "Traceback" in loud.output and "a bug" in loud.output


def test_unknown_device_is_a_device_error():
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu9")


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys; from selfment_label_cli.main import app; "
        "heavy = {'torch', 'timm', 'fiftyone', 'pycocotools', 'py_sod_metrics', 'numpy'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_wall_seconds_include_model_loading(monkeypatch, tmp_path, tiny_backbone):
    def slow_backbone(config):
        time.sleep(0.3)
        return tiny_backbone

    monkeypatch.setattr(labelling, "backbone_for", slow_backbone)
    images = write_noise(tmp_path / "img", 2)
    summary = label_folder(images, tmp_path / "o", tiny_config())
    assert summary.stages["load model"] >= 0.3
    assert summary.wall_seconds >= summary.seconds + 0.3
    result = CliRunner().invoke(app, ["run", str(images), "--out", str(tmp_path / "o2")])
    assert "load model s" in result.output and "wall s (all)" in result.output


def test_the_rate_counts_only_images_labelled_now():
    """A resumed run: 100 images already done, then 4 labelled in one batch 10 s after the
    start, then 4 more 10 s later: 0.4 img/s, not the speed of the batch's burst."""
    clock = [0.0]
    progress = Progress(RateColumn(), get_time=lambda: clock[0], disable=True)
    on_image = LabelProgress(progress)
    column = RateColumn()
    task = progress.tasks[0]
    for batch in range(2):
        clock[0] = 10.0 * (batch + 1)
        for i in range(4):
            clock[0] += 0.0001
            on_image(100 + 4 * batch + i + 1, 200, f"{batch}-{i}.png", None)
        assert column.render(task).plain == "0.40 img/s"  # rich's speed: 10000, then 0.70
