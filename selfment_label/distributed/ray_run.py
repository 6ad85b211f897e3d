"""Labelling on a Ray cluster with Ray Data: the ``Executor`` behind ``run --ray``/``apply --ray``.

The driver (the process that called ``label_folder``) lists the images, holds the run lock and
the journal, and writes every result as it streams back, exactly as a local run does; Ray Data
does the work in between:

    names -> read bytes (CPU tasks) -> decode + resize (CPU tasks)
          -> backbone + segmenter or head (an actor pool, one GPU per actor when there are GPUs)
          -> per-image rows, streamed to the driver (``iter_batches``), journalled one by one

The actors run the driver's ``Labeller`` (shipped through Ray's object store, so the weights
file need only be on the driver), hence the same masks as a local run. A killed driver leaves
a journal that the next run resumes; the driver never holds more than a few batches of rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import RAY_ADDRESS_ENV, RAY_CPU_THREADS_PER_ACTOR, RayConfig, RunConfig
from ..data.batching import lookahead
from ..device import DeviceError, resolve_device
from ..engine import LabelJob, Labeller
from ..errors import SelfmentError
from ..refine import guide_side
from .stages import (
    DecodeSettings,
    LabelActor,
    decode_images,
    finished_image,
    labeller_on,
    read_images,
)

logger = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
"""How long a cluster address may take to accept a TCP connection before the run gives up."""
DECODE_CPUS = 1.0
"""Logical CPUs left to the read/decode tasks (decoding is ~5% of the work at 448 px)."""
MAX_BLOCKS = 10_000


class RayUnavailable(SelfmentError, RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-sentence error naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part a run needs)
    except ImportError:
        raise RayUnavailable(
            'Ray Data is not installed: pip install -e ".[ray]" (or pip install "ray[data]")'
        ) from None
    return ray


@dataclass
class ActorPlan:
    """How many model replicas, and what each asks of the cluster.

    Arguments:
      actors: size of the pool.
      num_cpus, num_gpus: logical resources per actor.
      threads: torch CPU threads per actor (None: Ray's default, for GPU actors).
    """

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int | None


def plan_actors(resources: dict[str, float], actors: int | None, device: str) -> ActorPlan:
    """Size the actor pool from the cluster's resources.

    With GPUs (and ``device`` not ``cpu``) there is one actor per GPU by default, each asking
    for one GPU (a share of one when asked for more actors than GPUs) and one CPU. On CPUs only
    the default is one actor per ``RAY_CPU_THREADS_PER_ACTOR`` CPUs; the actors share the CPUs
    left after ``DECODE_CPUS`` for decoding, and each runs torch on its share of all CPUs
    (decoding is light, so it overlaps the model on the same cores).

    Raises:
      DeviceError: ``device`` asks for CUDA and the cluster has no GPU.
    """
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0)) if device != "cpu" else 0.0
    if device.startswith("cuda") and gpus < 1:
        raise DeviceError(
            f"device {device} was asked for but the Ray cluster has no GPU", remedy="device"
        )
    if gpus >= 1:
        count = actors or int(gpus)
        spare = max(cpus - DECODE_CPUS, 0.0)
        return ActorPlan(count, min(1.0, spare / count), min(1.0, gpus / count), None)
    count = actors or max(1, int(cpus) // RAY_CPU_THREADS_PER_ACTOR)
    share = max(cpus - DECODE_CPUS, 0.0) / count
    return ActorPlan(count, share, 0.0, max(1, round(cpus / count)))


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""An HTTP/2 client's connection preface and an empty SETTINGS frame: what a gRPC client sends
first. Ray's cluster (GCS) and Ray Client servers are gRPC servers, which answer it with their
own SETTINGS frame (frame type 4, the fourth byte of its 9-byte header)."""
SETTINGS_FRAME = 4


def _first_answer(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes the server sends first (fewer when it closes the connection)."""
    answer = b""
    while len(answer) < size:
        chunk = sock.recv(size - len(answer))
        if not chunk:
            break
        answer += chunk
    return answer


def check_reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Fail fast, in one sentence, when a ``host:port`` or ``ray://host:port`` address does not
    answer as a Ray cluster (``ray.init`` would retry for minutes): nothing accepts a
    connection there, or what does is not a gRPC server (it stays silent, answers something
    else, or closes). ``auto`` and other addresses are left to Ray; with ``RAY_USE_TLS`` only
    the connection is checked.

    Raises:
      RayUnavailable: the address does not answer as a Ray cluster within ``timeout`` seconds.
    """
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        raise RayUnavailable(
            f"cannot connect to the Ray cluster at {address}: {error} (is it started?)",
            remedy="ray_address",
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        try:
            sock.sendall(HTTP2_PREFACE)
            answer = _first_answer(sock, 9)
        except TimeoutError:
            raise RayUnavailable(
                f"{address} accepts connections but did not answer as a Ray cluster within "
                f"{timeout:g} s: something else listens there",
                remedy="ray_address",
            ) from None
        except OSError as error:
            answer = b""
            logger.debug("%s broke the connection: %s", address, error)
    if len(answer) < 9 or answer[3] != SETTINGS_FRAME:
        said = f"it answered {answer[:40]!r}" if answer else "it closed the connection"
        raise RayUnavailable(f"{address} is not a Ray cluster: {said}", remedy="ray_address")


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Connect to the cluster (or start a local instance) for one run, and let it go after.

    A Ray session already open in this process is used as it is and left open.

    Raises:
      RayUnavailable: no cluster answers at the address.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    target = address or os.environ.get(RAY_ADDRESS_ENV)
    if target:
        check_reachable(target)
    chatter = logging.INFO if logger.isEnabledFor(logging.DEBUG) else logging.ERROR
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": chatter}
    if address is None and not os.environ.get(RAY_ADDRESS_ENV):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise RayUnavailable(
            f"cannot connect to the Ray cluster at {target}: {error}", remedy="ray_address"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _driver_owns_progress(ray: Any) -> Iterator[None]:
    """Ray Data's own progress bars off while the run's bar shows (put back after)."""
    context = ray.data.DataContext.get_current()
    before = (context.enable_progress_bars, context.print_on_execution_start)
    context.enable_progress_bars = context.print_on_execution_start = False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = before


def _record_rows(batch: dict[str, Any], job: LabelJob, devices: Counter[str]) -> None:
    """Journal every row of a result batch on the driver, and charge its stage seconds."""
    for i, name in enumerate(batch["file_name"]):
        for stage, seconds in json.loads(batch["stages"][i]).items():
            job.recorder.timer.add(stage, seconds)
        if batch["error"][i]:
            job.recorder.skip(str(name), str(batch["error"][i]))
            continue
        devices[str(batch["device"][i])] += 1
        row = {"record": batch["record"][i], "score_png": batch["score_png"][i]}
        job.recorder.image(finished_image(row))


class RayExecutor:
    """Runs a labelling job on a Ray cluster with Ray Data (see the module docstring).

    Arguments:
      config: the cluster address and the actor count.

    Raises:
      RayUnavailable: Ray Data is not installed, or the cluster address does not answer as a
        Ray cluster (at once, before any work).
    """

    def __init__(self, config: RayConfig | None = None):
        self.config = config or RayConfig()
        ray = import_ray()
        target = self.config.address or os.environ.get(RAY_ADDRESS_ENV)
        if target and not ray.is_initialized():
            check_reachable(target)
        self._provenance: dict[str, Any] = {}

    def model_device(self, config: RunConfig) -> str:
        """The driver loads the model on the CPU only to ship it; the actors place it."""
        return "cpu"

    def provenance(self) -> dict[str, Any]:
        """run.json's ``ray`` (the cluster, the pool) and the actors' ``device``."""
        return self._provenance

    def __call__(self, job: LabelJob) -> None:
        """Label the job's images on the cluster, journalling each on the driver."""
        config = job.config
        with ray_cluster(self.config.address) as ray:
            resources = ray.cluster_resources()
            plan = plan_actors(resources, self.config.actors, config.device)
            labeller = labeller_on(job.labeller, resolve_device("cpu"))
            window = lookahead(config.batch_size)
            devices: Counter[str] = Counter()
            with _driver_owns_progress(ray), warnings.catch_warnings():
                # max_restarts goes through map_batches' **ray_remote_args, deprecated from
                # Ray 2.60 (removed in 2.64: the ray extra stays below it) for lack of a
                # named parameter
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
                dataset = self._dataset(ray, job, labeller, plan, window)
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    _record_rows(batch, job, devices)
            self._provenance = self._describe(ray, resources, plan, devices)

    def _dataset(
        self, ray: Any, job: LabelJob, labeller: Labeller, plan: ActorPlan, window: int
    ) -> Any:
        """The lazy Ray Data pipeline (a ``ray.data.Dataset``) of the job's images."""
        import pyarrow

        config = job.config
        mean, std = labeller.backbone.mean_std
        settings = DecodeSettings(
            config.resolution,
            labeller.backbone.patch_size,
            mean,
            std,
            config.max_pixels,
            guide_side(config.refine),
            config.zoom,
            labeller.picks_grid,
        )
        table = pyarrow.table({"file_name": job.todo})  # compact: no Python object per row
        rows = max(config.batch_size, math.ceil(len(job.todo) / MAX_BLOCKS))
        names = ray.data.from_arrow(
            [table.slice(start, rows) for start in range(0, len(job.todo), rows)]
        )
        return (
            names.map_batches(
                read_images, fn_kwargs={"reader": job.source}, batch_size=window, num_cpus=1
            )
            .map_batches(
                decode_images, fn_kwargs={"settings": settings}, batch_size=window, num_cpus=1
            )
            .map_batches(
                LabelActor,
                fn_constructor_kwargs={
                    "labeller": labeller,
                    "device": config.device,
                    "threads": plan.threads,
                    "save_scores": config.save_scores,
                    "batch_size": config.batch_size,
                },
                compute=ray.data.ActorPoolStrategy(size=plan.actors),
                batch_size=window,
                num_cpus=plan.num_cpus,
                num_gpus=plan.num_gpus,
                # a lost actor fails the run (the journal keeps what was done; run it again)
                # rather than restarting from constructor arguments Ray may have dropped
                # (Ray logs an error per actor otherwise, ray-project/ray#53727)
                max_restarts=0,
            )
        )

    def _describe(
        self, ray: Any, resources: dict[str, float], plan: ActorPlan, devices: Counter[str]
    ) -> dict[str, Any]:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        address = self.config.address or os.environ.get(RAY_ADDRESS_ENV) or "local instance"
        return {
            "device": ", ".join(sorted(devices)) or "none used",
            "ray": {
                "address": address,
                "ray_version": ray.__version__,
                "nodes": len(nodes),
                "cluster_resources": {
                    key: value for key, value in resources.items() if key in ("CPU", "GPU")
                },
                "actors": plan.actors,
                "actor_num_cpus": round(plan.num_cpus, 3),
                "actor_num_gpus": round(plan.num_gpus, 3),
                "actor_torch_threads": plan.threads,
                "images_per_device": dict(devices),
            },
        }
