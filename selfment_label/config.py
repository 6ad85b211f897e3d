"""Every option of a labelling run and its default, written once.

A run has shared options (backbone, resolution, device, batching, ...) in ``RunConfig`` and
the options of its mode in one dataclass per mode (``SingleConfig``, ``InstancesConfig``,
``EntitiesConfig``). The CLI's help, the Python API, the segmenters and ``run.json`` all
read their defaults from here, and ``run.json`` records only the options of the mode that
ran. This module imports nothing heavy, so the CLI can show its help without torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

DEFAULT_BACKBONE = "dinov2-vits14"
DEFAULT_RESOLUTION = 448
MIN_RESOLUTION = 28
MAX_RESOLUTION = 8192
DEFAULT_MAX_PIXELS = 120_000_000
PRECISION_NAMES = ("auto", "fp32", "fp16", "bf16")
DEFAULT_PRECISION = "auto"
PRECISION_HELP = (
    "Backbone precision: auto (bf16 on CPUs with native bf16 and on CUDA GPUs that have it, "
    "fp16 on older CUDA GPUs, fp32 elsewhere), fp32, fp16 or bf16"
)
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
EXPORT_FORMATS = ("coco", "yolo", "masks")
EXPORT_MEDIA = ("copy", "symlink", "none")
DEFAULT_EXPORT_FORMAT = EXPORT_FORMATS[0]
DEFAULT_EXPORT_MEDIA = EXPORT_MEDIA[0]
APP_PORT = 5151
APP_ADDRESS = "127.0.0.1"
"""Where the FiftyOne App listens by default: this machine only."""
EXPORT_VAL_FRACTION = 0.1
EXPORT_SPLIT_SEED = 0
YOLO_MIN_PIECE_AREA = 16
REFINE_METHODS = ("none", "guided", "crf")
"""Edge refinements of the full-size soft maps (``selfment_label.refine``): none, the fast
guided filter (kornia) or a dense CRF (pydensecrf2, the ``crf`` extra)."""
DEFAULT_REFINE = "guided"
REFINE_MAX_SIDE = 2048
"""Longest side, in pixels, of the image that guides the refinement: larger images are refined
at this size and the refined maps upsampled to full size."""
DEFAULT_ZOOM = 0.6
"""``--zoom``: side of each corner crop as a fraction of the image's (``selfment_label.zoom``;
docs/many-objects-learnt.md)."""
MIN_ZOOM, MAX_ZOOM = 0.3, 0.9
"""Allowed zoom fractions: smaller crops hold too little context, larger ones hardly zoom."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value}")
    return float(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, not {value}")


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and in ``[low, high]`` (``(low, high]``
    when ``low_open``)."""
    number = _number(name, value)
    if number < low or number > high or (low_open and number == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, not {value}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number above zero."""
    if _number(name, value) <= 0:
        raise ValueError(f"{name} must be above 0, not {value}")


class ModeOptions:
    """What every mode config shares: its mode name and the options it records."""

    mode: ClassVar[str]

    def options(self) -> dict[str, Any]:
        """The options as recorded in run.json and compared on resume: mode and fields."""
        return {"mode": self.mode, **asdict(self)}


@dataclass
class SingleConfig(ModeOptions):
    """Options of ``single`` mode: one main object per image (Normalized Cut, then IPO).

    Arguments:
      tau: cosine similarity above which two patches are linked in the NCut graph.
      ipo_iters: Iterative Patch Optimization rounds (0 keeps the raw cut).
      temperature: softness of the prototype scores ``sigmoid(margin / temperature)``; it
        shapes the soft map (threshold sweeps, MAE), not the 0.5 mask.
      border_prior: a mask that holds a larger share of the image's border patches than of
        the image (it runs along the frame) is taken for the background and swapped with its
        complement; each side is judged relative to its size, so close-ups whose object
        touches most of the frame keep their object; a split whose two sides it cannot tell
        apart (a cut inside a close-up's object) gets the part of the complement off the
        frame joined to the mask when the union is clearly the object
        (``single.join_inner_part``). Turn off to keep the cut's own side.
    """

    mode: ClassVar[str] = "single"

    tau: float = 0.2
    ipo_iters: int = 20
    temperature: float = 0.1
    border_prior: bool = True

    def __post_init__(self) -> None:
        check_range("tau", self.tau, -1.0, 1.0, low_open=True)
        check_int("ipo_iters", self.ipo_iters, 0)
        check_positive("temperature", self.temperature)
        check_bool("border_prior", self.border_prior)


@dataclass
class InstancesConfig(ModeOptions):
    """Options of ``instances`` mode: several objects, disjoint (MaskCut, then IPO).

    Arguments:
      tau: affinity threshold of the graph.
      ipo_iters: IPO rounds per instance (0 keeps the raw cuts).
      max_instances: most instances per image.
      min_area: smallest instance, as a fraction of the patches.
      border_prior: the first cut is swapped like single mode's mask when it holds a larger
        share of the border patches than of the image (later instances that run along the frame are
        background and are always dropped).
    """

    mode: ClassVar[str] = "instances"

    tau: float = SingleConfig.tau
    ipo_iters: int = SingleConfig.ipo_iters
    max_instances: int = 3
    min_area: float = 0.01
    border_prior: bool = SingleConfig.border_prior

    def __post_init__(self) -> None:
        check_range("tau", self.tau, -1.0, 1.0, low_open=True)
        check_int("ipo_iters", self.ipo_iters, 0)
        check_int("max_instances", self.max_instances, 1)
        check_range("min_area", self.min_area, 0.0, 1.0)
        check_bool("border_prior", self.border_prior)


@dataclass
class EntitiesConfig(ModeOptions):
    """Options of ``entities`` mode: entities that cover the image and their parts.

    Arguments:
      merge_floor: lowest merge similarity explored.
      persistence: similarity range an entity or part must survive to be kept.
      min_area: smallest entity or part, as a fraction of the patches.
    """

    mode: ClassVar[str] = "entities"

    merge_floor: float = 0.4
    persistence: float = 0.1
    min_area: float = InstancesConfig.min_area

    def __post_init__(self) -> None:
        check_range("merge_floor", self.merge_floor, -1.0, 1.0)
        check_range("persistence", self.persistence, 0.0, 2.0)
        check_range("min_area", self.min_area, 0.0, 1.0)


ModeConfig = SingleConfig | InstancesConfig | EntitiesConfig
MODE_CONFIGS: dict[str, type[ModeConfig]] = {
    cls.mode: cls for cls in (SingleConfig, InstancesConfig, EntitiesConfig)
}
MODES = tuple(MODE_CONFIGS)
MODE_OPTIONS = tuple(
    dict.fromkeys(f.name for cls in MODE_CONFIGS.values() for f in fields(cls) if f.init)
)
"""Every option of some mode, in the order the modes declare them."""


def modes_using(option: str) -> list[str]:
    """The modes that have ``option`` (``max_instances`` -> ``["instances"]``)."""
    return [mode for mode, cls in MODE_CONFIGS.items() if option in {f.name for f in fields(cls)}]


def mode_config(mode: str, **values: Any) -> ModeConfig:
    """The options of ``mode``, taking from ``values`` those the mode has (others ignored).

    Arguments:
      mode: ``single``, ``instances`` or ``entities``.
      values: option values by name (e.g. every mode option of the CLI).

    Raises:
      ValueError: unknown mode.
    """
    if mode not in MODE_CONFIGS:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    cls = MODE_CONFIGS[mode]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class RunConfig:
    """Options of a labelling run.

    Arguments:
      backbone: preset name.
      weights: local weights file (else ``$SELFMENT_WEIGHTS``, else the hub).
      resolution: pixels on the long side of the resized image.
      device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
      precision: backbone precision: ``auto`` (resolved per device by
        ``selfment_label.device.resolve_precision``), ``fp32``, ``fp16`` or ``bf16``.
      batch_size: images per backbone batch (images of one patch grid).
      workers: decoding threads.
      save_scores: also write the soft score map of each image as an 8-bit PNG.
      max_pixels: larger images are skipped as decompression bombs.
      allow_download: whether hub downloads are allowed when no weights file is given.
      refine: edge refinement of the full-size soft maps, guided by the image: ``none``,
        ``guided`` (fast guided filter) or ``crf`` (dense CRF, needs the ``crf`` extra).
      segment: the mode and its options (``SingleConfig``, ``InstancesConfig`` or
        ``EntitiesConfig``).
      zoom: also label four corner crops of this fraction of each side of every image and
        merge their masks into the full view's (``selfment_label.zoom``; five backbone passes
        per image); None: the full view only. For segmenters of flat, disjoint instances
        (``instances`` mode, an instance head without parts).
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    resolution: int = DEFAULT_RESOLUTION
    device: str = "auto"
    precision: str = DEFAULT_PRECISION
    batch_size: int = 4
    workers: int = 2
    save_scores: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_download: bool = True
    refine: str = DEFAULT_REFINE
    segment: ModeConfig = field(default_factory=SingleConfig)
    zoom: float | None = None

    def __post_init__(self) -> None:
        check_int("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION)
        if self.zoom is not None:
            check_range("zoom", self.zoom, MIN_ZOOM, MAX_ZOOM)
        check_int("batch_size", self.batch_size, 1)
        check_int("workers", self.workers, 1)
        check_int("max_pixels", self.max_pixels, 1)
        if self.precision not in PRECISION_NAMES:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISION_NAMES)}, not {self.precision!r}"
            )
        if self.refine not in REFINE_METHODS:
            raise ValueError(
                f"refine must be one of {', '.join(REFINE_METHODS)}, not {self.refine!r}"
            )
        if not isinstance(self.segment, ModeConfig):
            raise ValueError(f"segment must be a mode config, not {self.segment!r}")

    @property
    def mode(self) -> str:
        """The run's mode (``single``, ``instances`` or ``entities``)."""
        return self.segment.mode

    def shared_options(self) -> dict[str, Any]:
        """The options every mode has (everything but ``segment``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "segment"}


RAY_ADDRESS_ENV = "RAY_ADDRESS"
RAY_CPU_THREADS_PER_ACTOR = 8


@dataclass
class RayConfig:
    """Where and how wide a ``--ray`` run goes.

    Arguments:
      address: the cluster: ``auto`` (the one this machine belongs to), ``ray://host:port``
        (Ray Client) or a GCS ``host:port``; None reads ``$RAY_ADDRESS``, and without it a
        local Ray instance is started for the run and stopped after it.
      actors: model replicas (actors of the labelling pool); None: one per GPU of the cluster,
        or on a CPU-only cluster one per ``RAY_CPU_THREADS_PER_ACTOR`` CPUs (at least one).
    """

    address: str | None = None
    actors: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None:
            check_int("ray_actors", self.actors, 1)
        if self.address is not None and not str(self.address).strip():
            raise ValueError("ray_address must not be empty (leave it out for a local instance)")


HEAD_FLIP = False
"""Whether ``apply`` runs the single head with test-time flip by default (docs/head.md)."""

KEEP_SCORE = 0.7
"""Self-correction: a teacher mask scored at least this replaces the pseudo-mask it matches."""
DROP_SCORE = 0.2
"""Self-correction: a pseudo-mask no teacher mask scored at least this matches is dropped."""
MATCH_IOU = 0.5
"""Self-correction: patch-grid IoU at which a teacher mask matches a pseudo-mask."""


@dataclass
class TrainConfig:
    """Options of head training.

    Arguments:
      epochs: passes over the training images.
      lr: Adam learning rate.
      weight_decay: Adam weight decay.
      batch_size: images per optimisation step.
      seed: seeds initialisation, shuffling and the contrastive subsample.
      contrastive_weight: weight of the supervised contrastive term.
      temperature: temperature of the supervised contrastive term.
      contrastive_patches: patches subsampled per step for the contrastive term.
      target_threshold: binarise the patch targets at this area fraction (None keeps the
        soft area fractions).
      layers: backbone blocks (from 0) whose tokens, each after the final norm, the head
        reads concatenated; None: the last layer's only.
      rounds: self-correction rounds after the first training (``head.rounds``: the last
        head's confident mask replaces the target it matches, a target it does not believe
        is dropped), each training a new head on the corrected targets (1 round: maxF,
        accuracy and MAE better for each of 3 seeds, IoU for 2; docs/head.md).
      keep_score: a head's mask scored at least this replaces the target it matches (0.9
        for the single head: its scores run higher than the instance head's; 0.7 gave
        IoU +0.004 but maxF -0.001 over 3 seeds).
      drop_score, match_iou: the other rules of those rounds (``InstanceTrainConfig``).
    """

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 8
    seed: int = 0
    contrastive_weight: float = 0.1
    temperature: float = 0.05
    contrastive_patches: int = 256
    target_threshold: float | None = None
    layers: tuple[int, ...] | None = None
    rounds: int = 1
    keep_score: float = 0.9
    drop_score: float = DROP_SCORE
    match_iou: float = MATCH_IOU

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for layer in self.layers:
                check_int("layers", layer, 0)
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct block indices, not {list(self.layers)}")
        check_int("rounds", self.rounds, 0)
        check_range("keep_score", self.keep_score, 0.0, 1.0)
        check_range("drop_score", self.drop_score, 0.0, 1.0)
        check_range("match_iou", self.match_iou, 0.0, 1.0, low_open=True)
        check_int("epochs", self.epochs, 1)
        check_positive("lr", self.lr)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_range("contrastive_weight", self.contrastive_weight, 0.0, 1e6)
        check_positive("temperature", self.temperature)
        check_int("contrastive_patches", self.contrastive_patches, 2)
        if self.target_threshold is not None:
            check_range("target_threshold", self.target_threshold, 0.0, 1.0)


HEAD_TASKS = ("single", "instances")
"""What ``train`` learns: ``single`` (the patch head: the union of an image's masks) or
``instances`` (the query-based instance head: a scored set of masks per image)."""


def default_task(run_mode: str) -> str:
    """The head ``train`` learns from a run of ``run_mode`` unless told: the instance head for
    ``instances`` and ``entities`` runs, the single-object head otherwise."""
    return "instances" if run_mode in ("instances", "entities") else "single"


@dataclass
class InstanceApplyConfig:
    """How an instance head's predictions become an image's annotations.

    Arguments:
      max_instances: most masks written per image (after NMS, best scores first).
      min_score: masks scored below this are not written.
      nms_iou: a mask whose patch-grid IoU with a better-scored kept mask is above this is
        dropped (mask-level non-maximum suppression).
    """

    max_instances: int = 50
    min_score: float = 0.05
    nms_iou: float = 0.5

    def __post_init__(self) -> None:
        check_int("max_instances", self.max_instances, 1)
        check_range("min_score", self.min_score, 0.0, 1.0)
        check_range("nms_iou", self.nms_iou, 0.0, 1.0)


@dataclass
class InstanceTrainConfig:
    """Options of instance head training (query decoder, Hungarian matching) and its
    self-correction rounds.

    Arguments:
      epochs: passes over the training images per round.
      lr: AdamW learning rate.
      weight_decay: AdamW weight decay.
      batch_size: images per optimisation step.
      seed: seeds initialisation and shuffling.
      queries: learned queries (most masks per image the head can predict).
      hidden: width of the decoder.
      layers: decoder layers (query self-attention + cross-attention to the patches).
      heads: attention heads.
      no_object_weight: weight of the objectness loss of unmatched queries (DETR's 0.1).
      drop_loss_iou: unmatched queries whose mask overlaps no pseudo-mask by at least this
        IoU get no objectness loss (CutLER's DropLoss: a missed object is not punished); 0
        turns it off.
      part_queries: queries of the second set that learns an ``entities`` run's parts (used
        only when the run has parts).
      rounds: self-correction rounds after the first training (0: none; 1 raised AP and
        AR@100 in both coco-dev benchmarks, docs/many-objects-learnt.md).
      keep_score: teacher masks scored at least this replace the pseudo-mask they match or
        are added as a missed object.
      drop_score: a pseudo-mask that no teacher mask scored at least this matches is dropped.
      match_iou: patch-grid IoU at which a teacher mask matches a pseudo-mask.
      token_flip: also learn every image mirrored on the patch grid (its tokens and masks
        flipped left to right; no backbone pass): a second training image per image
        (docs/many-objects-learnt.md).
    """

    epochs: int = 40
    lr: float = 3e-4
    weight_decay: float = 1e-5
    batch_size: int = 8
    seed: int = 0
    queries: int = 50
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    no_object_weight: float = 0.1
    drop_loss_iou: float = 0.01
    part_queries: int = 30
    rounds: int = 1
    keep_score: float = KEEP_SCORE
    drop_score: float = DROP_SCORE
    match_iou: float = MATCH_IOU
    token_flip: bool = True

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_positive("lr", self.lr)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("queries", self.queries, 1)
        check_int("hidden", self.hidden, 1)
        check_int("layers", self.layers, 1)
        check_int("heads", self.heads, 1)
        check_int("part_queries", self.part_queries, 0)
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        check_range("no_object_weight", self.no_object_weight, 0.0, 1.0)
        check_range("drop_loss_iou", self.drop_loss_iou, 0.0, 1.0)
        check_int("rounds", self.rounds, 0)
        check_range("keep_score", self.keep_score, 0.0, 1.0)
        check_range("drop_score", self.drop_score, 0.0, 1.0)
        check_range("match_iou", self.match_iou, 0.0, 1.0, low_open=True)


REVIEW_EXCLUDE_TAGS = ("rejected",)
"""Sample tags that ``train --reviewed`` leaves out by default."""
