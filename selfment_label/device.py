"""Where the work runs: device choice, backbone precision, CPU threads of the small stages.

Precision ``auto`` (the default) picks the backbone's precision from the hardware: bf16 on a
CPU that runs it natively (AMX or AVX512-BF16), bf16 on a CUDA GPU that has it (Ampere and
newer), fp16 on older CUDA GPUs with tensor cores (compute capability 7.x), fp32 elsewhere.
``resolve_precision`` says which and why; run.json records it. Only the backbone runs in the
reduced precision: its tokens leave it as float32.

The backbone's big matrix products use every torch intra-op thread well. The stages after
it (graph, eigensolver, IPO, upsampling) are many small kernels that each end in a barrier;
past a couple of threads they gain nothing and one descheduled thread stalls them all. They
run with exactly ``SMALL_KERNEL_THREADS`` threads, whatever the caller's count: on a quiet
2-core machine 2 threads halve their cost against 1 (NCut 24 -> 13 ms, IPO 13 -> 7 ms per
image at 448 px; benchmarks/NOTES.md). Exactly, not at most: torch splits a reduction (a
sum, a mean, a matrix product's partial sums) into one chunk per thread, so its last bits
depend on the thread count, and the cut, IPO and the instance stop rules turn last-bit
differences into different masks. With one fixed count the same image gets the same masks
on a 1-, 2- or 64-core machine and under a caller that changed torch's threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PRECISION_NAMES
from .errors import SelfmentError

logger = logging.getLogger(__name__)

SMALL_KERNEL_THREADS = 2
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The concrete precisions (``auto`` resolves to one of them) and their reduced dtype."""
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of CPUs that run bf16 matrix products natively."""


class DeviceError(SelfmentError, RuntimeError):
    """The device asked for does not exist on this machine."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to torch.

    Raises:
      DeviceError: an unknown device name, or CUDA asked for where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(
            f"unknown device {device!r}: the devices are auto, cpu, cuda or cuda:N", remedy="device"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device} was asked for but torch sees no CUDA device", remedy="device"
        )
    return resolved


@contextmanager
def small_kernel_threads(
    device: torch.device, threads: int = SMALL_KERNEL_THREADS
) -> Iterator[None]:
    """Run the block's CPU work with exactly ``threads`` torch intra-op threads.

    The count is fixed, not capped, so that results do not depend on the machine's cores or
    on the caller's setting (see the module docstring). It puts back the caller's count when
    it ends (also on error). With torch's OpenMP runtime the count belongs to the calling
    thread once that thread has run a parallel kernel, but a thread that has not yet run one
    takes whatever count was set last, from any thread: a background thread started while
    this block runs would keep ``threads`` for good (``pin_threads`` guards against that).
    No effect for CUDA work.

    Arguments:
      device: where the block's tensors live; only ``cpu`` work is pinned.
      threads: intra-op threads inside the block.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pin_threads(threads: int) -> None:
    """Give the calling thread exactly ``threads`` torch intra-op threads.

    A worker thread (the engine's backbone-ahead thread) calls it before its work with the
    count its caller had: otherwise the worker's count is fixed by its first parallel kernel
    to whatever count was set last in the process, which is ``SMALL_KERNEL_THREADS`` when
    that kernel runs while the caller is inside ``small_kernel_threads`` (a backbone on 2
    threads of a 64-core machine).
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Precision:
    """The backbone precision a run uses.

    Arguments:
      asked: what the user asked for (``auto``, ``fp32``, ``fp16``, ``bf16``).
      name: what is used (``fp32``, ``fp16`` or ``bf16``).
      reason: why, in a sentence (recorded in run.json).
    """

    asked: str
    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The reduced dtype of the backbone, or None for float32."""
        return PRECISIONS[self.name]

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form (run.json's ``precision``)."""
        return {"asked": self.asked, "used": self.name, "reason": self.reason}


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> str | None:
    """The CPU feature that runs bf16 natively (``AMX``, ``AVX512-BF16``), or None.

    torch's own CPU checks are asked first; ``/proc/cpuinfo`` flags where torch lacks them.
    """
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    asked_torch = False
    for feature, name in checks:
        check = getattr(torch.cpu, name, None)
        if check is not None:
            asked_torch = True
            if check():
                return feature
    if asked_torch:
        return None
    flags = _cpuinfo_flags()
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return found[0].upper().replace("_", "-") if found else None


def _cuda_precision(device: torch.device) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return "bf16", f"auto: {name} (compute capability {major}.{minor}) runs bf16 natively"
    if major >= 7:
        return "fp16", f"auto: {name} (compute capability {major}.{minor}) has fp16 tensor cores"
    return "fp32", f"auto: {name} (compute capability {major}.{minor}) lacks fast half precision"


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """The precision ``asked`` means on ``device`` (``auto`` picks from the hardware).

    Arguments:
      asked: ``auto``, ``fp32``, ``fp16`` or ``bf16``.
      device: where the backbone runs.

    Raises:
      ValueError: an unknown precision name.
    """
    if asked not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_NAMES)}, not {asked!r}")
    if asked != "auto":
        return Precision(asked, asked, "asked for")
    if device.type == "cuda":
        name, reason = _cuda_precision(device)
    elif device.type == "cpu":
        feature = cpu_bf16_support()
        if feature:
            name, reason = "bf16", f"auto: the CPU runs bf16 natively ({feature})"
        else:
            name, reason = "fp32", "auto: the CPU has neither AMX nor AVX512-BF16"
    else:
        name, reason = "fp32", f"auto: no reduced precision is chosen on {device.type}"
    logger.info("precision %s (%s)", name, reason)
    return Precision(asked, name, reason)
