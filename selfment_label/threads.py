"""CPU thread placement of the pipeline's stages.

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

SMALL_KERNEL_THREADS = 2


@contextmanager
def small_kernel_threads(
    device: torch.device, threads: int = SMALL_KERNEL_THREADS
) -> Iterator[None]:
    """Limit torch's CPU intra-op threads inside the block (no effect for CUDA work).

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
