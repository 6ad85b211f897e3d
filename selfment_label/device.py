"""Where the work runs: device choice, backbone precision, CPU threads of the small stages.

The backbone's big matrix products use every torch intra-op thread well. The stages after
it (graph, eigensolver, IPO, upsampling) are many small kernels that each end in a barrier;
past a couple of threads they gain nothing and one descheduled thread stalls them all. They
run with at most ``SMALL_KERNEL_THREADS`` threads: on a quiet 2-core machine 2 threads
halve their cost against 1 (NCut 24 -> 13 ms, IPO 13 -> 7 ms per image at 448 px;
benchmarks/NOTES.md), while on a machine crowded by other processes 1 thread was the
safer choice (set it with ``small_kernel_threads(device, threads=1)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config import PRECISION_NAMES

SMALL_KERNEL_THREADS = 2
PRECISIONS: dict[str, torch.dtype | None] = dict(
    zip(PRECISION_NAMES, (None, torch.float16, torch.bfloat16), strict=True)
)


class DeviceError(RuntimeError):
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
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but torch sees no CUDA device")
    return resolved


@contextmanager
def small_kernel_threads(
    device: torch.device, threads: int = SMALL_KERNEL_THREADS
) -> Iterator[None]:
    """Limit torch's CPU intra-op threads inside the block, and restore them after it.

    torch's thread count is process-wide: the block changes it for every thread of the
    process while it runs, and puts back the caller's count when it ends (also on error).
    No effect for CUDA work.

    Arguments:
      device: where the block's tensors live; only ``cpu`` is limited.
      threads: intra-op threads inside the block.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
