"""Where the work runs: device choice, backbone precision, CPU threads of the small stages.

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
    """Run the block's CPU work with exactly ``threads`` torch intra-op threads.

    The count is fixed, not capped, so that results do not depend on the machine's cores or
    on the caller's setting (see the module docstring). torch's thread count is
    process-wide: the block changes it for every thread of the process while it runs, and
    puts back the caller's count when it ends (also on error). No effect for CUDA work.

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
