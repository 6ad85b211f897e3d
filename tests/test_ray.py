"""``--ray``: a local Ray instance labels like a local run; resume after a killed driver; S3 input.

One local Ray instance (2 CPUs, no dashboard) and one S3 server (moto in server mode) on
127.0.0.1 serve the whole module and are stopped at its end. The S3 settings are in the
environment before Ray starts, so Ray's workers read the same server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import copy_ecssd, ecssd_stems, scene, tiny_config
from pycocotools.coco import COCO
from selfment_label_cli.main import app
from typer.testing import CliRunner

from selfment_label.config import RayConfig, RunConfig
from selfment_label.device import DeviceError
from selfment_label.distributed.ray_run import (
    ActorPlan,
    RayExecutor,
    RayUnavailable,
    check_reachable,
    plan_actors,
)
from selfment_label.runfolder.label import label_folder
from selfment_label.runfolder.layout import RunFolderError, read_run

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="the test-s3 extra is not installed")


BUCKET = "images"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 server (moto) on 127.0.0.1, in the environment as ``AWS_ENDPOINT_URL``."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def local_ray(s3_endpoint: str) -> Iterator[None]:
    """A local Ray instance with 2 CPUs for the module (the executors use it as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture()
def small_folder(tmp_path: Path) -> Path:
    """Six images of three grids in two folders, and two bad files."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for seed in range(3):
        scene(seed).save(root / f"a{seed}.png")
    scene(3, (72, 96)).save(root / "sub" / "tall.jpg")
    scene(4, (140, 60)).convert("L").save(root / "sub" / "wide.png")
    scene(5).save(root / "sub" / "a0.png")
    (root / "fake.jpg").write_text("not an image")
    (root / "zero.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image either")
    return root


def _same_output(one: Path, other: Path) -> None:
    """Two run folders hold the same COCO images/annotations, skips and score maps."""
    first = json.loads((one / "annotations.json").read_text())
    second = json.loads((other / "annotations.json").read_text())
    assert first["images"] == second["images"]
    assert first["annotations"] == second["annotations"]
    assert len(first["annotations"]) > 0
    runs = [json.loads((run / "run.json").read_text()) for run in (one, other)]
    assert runs[0]["images_skipped"] == runs[1]["images_skipped"]
    assert runs[0]["options"] == runs[1]["options"]
    for image in first["images"]:
        if "score_map" in image:
            path = image["score_map"]
            assert (one / path).read_bytes() == (other / path).read_bytes()


def test_ray_run_writes_what_a_local_run_writes(local_ray, small_folder, tmp_path, tiny_backbone):
    config = tiny_config(batch_size=2, save_scores=True)
    local = tmp_path / "local"
    on_ray = tmp_path / "ray"
    label_folder(small_folder, local, config, backbone=tiny_backbone)
    seen: list[tuple[int, int, str, str | None]] = []
    summary = label_folder(
        small_folder,
        on_ray,
        config,
        backbone=tiny_backbone,
        executor=RayExecutor(RayConfig(actors=2)),
        progress=lambda *update: seen.append(update),
    )
    _same_output(local, on_ray)
    assert summary.labelled == 6 and set(summary.skipped) == {"fake.jpg", "zero.png"}
    assert summary.skipped["zero.png"] == "empty file (0 bytes)"
    assert [update[0] for update in seen] == list(range(1, 9)) and seen[-1][1] == 8
    run = json.loads((on_ray / "run.json").read_text())
    assert run["ray"]["actors"] == 2 and run["ray"]["nodes"] == 1
    assert run["ray"]["cluster_resources"] == {"CPU": 2.0}
    assert run["ray"]["images_per_device"] == {"cpu": 6} and run["device"] == "cpu"
    assert {"read", "decode", "backbone", "ncut", "ipo", "masks", "write"} <= set(
        run["stage_seconds"]
    )
    COCO(str(on_ray / "annotations.json"))
    # a second --ray run finds everything done and retries only the skips
    again = label_folder(
        small_folder, on_ray, config, backbone=tiny_backbone, executor=RayExecutor()
    )
    assert again.labelled == 0 and again.resumed == 6 and len(again.new_skips) == 2


def test_ray_run_with_the_real_backbone_gives_the_local_masks(
    local_ray, ecssd_dir, real_backbone, tmp_path
):
    images = copy_ecssd(ecssd_dir, tmp_path / "images", ecssd_stems(4))
    config = RunConfig(resolution=224, batch_size=2)
    label_folder(images, tmp_path / "local", config, backbone=real_backbone)
    label_folder(
        images,
        tmp_path / "ray",
        config,
        backbone=real_backbone,
        executor=RayExecutor(RayConfig(actors=1)),
    )
    _same_output(tmp_path / "local", tmp_path / "ray")


def test_apply_on_ray_gives_the_local_head_masks(local_ray, small_folder, tmp_path, tiny_backbone):
    from selfment_label.config import TrainConfig
    from selfment_label.head.apply import apply_head
    from selfment_label.head.train import distil

    config = tiny_config(workers=1, save_scores=True)
    label_folder(small_folder, tmp_path / "run", config, backbone=tiny_backbone)
    trained = distil(
        tmp_path / "run",
        tmp_path / "head.pt",
        TrainConfig(epochs=1, rounds=0),
        backbone=tiny_backbone,
    )
    local, on_ray = tmp_path / "applied", tmp_path / "applied-ray"
    apply_head(trained.checkpoint, small_folder, local, config, backbone=tiny_backbone)
    apply_head(
        trained.checkpoint,
        small_folder,
        on_ray,
        config,
        backbone=tiny_backbone,
        executor=RayExecutor(RayConfig(actors=1)),
    )
    _same_output(local, on_ray)
    assert json.loads((on_ray / "run.json").read_text())["options"]["mode"] == "head"


def _bucket():
    import boto3

    client = boto3.client("s3")
    if not client.list_buckets().get("Buckets"):
        client.create_bucket(Bucket=BUCKET)
    return client


def _upload(folder: Path, prefix: str) -> None:
    client = _bucket()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key=f"{prefix}-other/x.png", Body=b"outside the prefix")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/.hidden/y.png", Body=b"hidden")


def test_s3_input_on_ray_and_locally(local_ray, small_folder, tmp_path, tiny_backbone):
    _upload(small_folder, "set/one")
    uri = f"s3://{BUCKET}/set/one"
    config = tiny_config(save_scores=True)
    label_folder(small_folder, tmp_path / "from-disk", config, backbone=tiny_backbone)
    label_folder(uri, tmp_path / "s3-local", config, backbone=tiny_backbone)
    summary = label_folder(
        uri, tmp_path / "s3-ray", config, backbone=tiny_backbone, executor=RayExecutor()
    )
    assert summary.labelled == 6 and set(summary.skipped) == {"fake.jpg", "zero.png"}
    for run in ("s3-local", "s3-ray"):
        _same_output(tmp_path / "from-disk", tmp_path / run)
        provenance = json.loads((tmp_path / run / "run.json").read_text())
        assert provenance["input_dir"] == uri
    names = [i["file_name"] for i in read_run(tmp_path / "s3-ray").coco["images"]]
    assert names == ["a0.png", "a1.png", "a2.png", "sub/a0.png", "sub/tall.jpg", "sub/wide.png"]
    with pytest.raises(RunFolderError, match="object storage"):
        _ = read_run(tmp_path / "s3-ray").input_dir
    # resumable from object storage too: nothing new, the skips retried
    again = label_folder(uri, tmp_path / "s3-local", config, backbone=tiny_backbone)
    assert again.labelled == 0 and again.resumed == 6


def test_missing_bucket_and_empty_prefix_are_clear_errors(local_ray, tmp_path, tiny_backbone):
    from selfment_label.data.storage import StorageError
    from selfment_label.runfolder.label import NoImages

    _bucket()
    with pytest.raises(NoImages, match="no images found under s3://"):
        label_folder(f"s3://{BUCKET}/nothing/here", tmp_path / "o", backbone=tiny_backbone)
    with pytest.raises(StorageError, match="cannot list s3://no-such-bucket"):
        label_folder("s3://no-such-bucket/x", tmp_path / "o", backbone=tiny_backbone)


def test_actor_plan_follows_the_cluster():
    assert plan_actors({"CPU": 2.0}, None, "auto") == ActorPlan(1, 1.0, 0.0, 2)
    assert plan_actors({"CPU": 2.0}, 2, "auto") == ActorPlan(2, 0.5, 0.0, 1)
    assert plan_actors({"CPU": 64.0}, None, "cpu") == ActorPlan(8, 63 / 8, 0.0, 8)
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, None, "auto") == ActorPlan(4, 1.0, 1.0, None)
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, 8, "auto").num_gpus == 0.5
    assert plan_actors({"CPU": 32.0, "GPU": 4.0}, None, "cpu").num_gpus == 0.0
    with pytest.raises(DeviceError, match="no GPU"):
        plan_actors({"CPU": 8.0}, None, "cuda")


def test_unreachable_cluster_fails_fast_in_one_sentence():
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(RayUnavailable, match=f"cannot connect to the Ray cluster at {address}"):
            check_reachable(address, timeout=2)
    check_reachable("auto")  # left to Ray


@contextmanager
def tcp_server(reply: bytes | None) -> Iterator[str]:
    """A server on 127.0.0.1 that accepts every connection, sends ``reply`` and closes it (None:
    keeps it open and says nothing, ever); stopped, with its connections, on exit."""
    server = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connections.append(connection)
            if reply is not None:
                connection.sendall(reply)
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for connection in connections:
            connection.close()
        thread.join(timeout=5)


def test_an_address_that_is_not_ray_fails_in_one_sentence_before_the_model_loads(tmp_path):
    with tcp_server(None) as silent:
        for address in (silent, f"ray://{silent}"):
            with pytest.raises(RayUnavailable, match="did not answer as a Ray cluster within 1 s"):
                check_reachable(address, timeout=1)
        # a fresh process (this one may hold a Ray session); with no weights at hand, a model
        # loaded before the address is checked would fail on the weights instead
        scene(0).save(tmp_path / "a.png")
        command = ["run", str(tmp_path), "--ray", "--ray-address", silent, "--offline"]
        env = {k: v for k, v in os.environ.items() if k not in ("SELFMENT_WEIGHTS", "RAY_ADDRESS")}
        result = subprocess.run(
            [sys.executable, "-m", "selfment_label_cli", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        text = " ".join(result.stderr.split())
        assert f"{silent} accepts connections but did not answer as a Ray cluster" in text
        assert "leave out --ray-address for a local instance" in text  # the CLI's advice
        assert "Traceback" not in text
    with tcp_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as web:
        with pytest.raises(RayUnavailable, match=r"is not a Ray cluster: it answered b'HTTP/1.1"):
            check_reachable(web, timeout=5)
    with tcp_server(b"") as closing:
        with pytest.raises(RayUnavailable, match="not a Ray cluster: it closed the connection"):
            check_reachable(closing, timeout=5)


def test_a_real_ray_cluster_passes_the_handshake(local_ray):
    check_reachable(ray.get_runtime_context().gcs_address, timeout=5)


def test_an_object_storage_endpoint_that_never_answers_is_named(monkeypatch, tmp_path):
    from selfment_label.data import storage

    monkeypatch.setattr(storage, "ENDPOINT_SECONDS", 1.0)
    with tcp_server(None) as silent:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{silent}")
        with pytest.raises(storage.StorageError, match=f"http://{silent} accepts connections"):
            label_folder(f"s3://{BUCKET}/x", tmp_path / "o", backbone=None)
    query = f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:1&scheme=http"
    with pytest.raises(storage.StorageError, match="cannot reach .* http://127.0.0.1:1"):
        label_folder(query, tmp_path / "o")


def test_missing_ray_is_one_sentence_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailable, match=r'pip install -e "\.\[ray\]"'):
        RayExecutor()
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--ray"])
    assert result.exit_code == 1
    assert 'pip install -e ".[ray]"' in result.output and "Traceback" not in result.output
    options = CliRunner().invoke(app, ["run", str(tmp_path), "--ray-actors", "2"])
    assert options.exit_code == 1 and "pass --ray too" in options.output
