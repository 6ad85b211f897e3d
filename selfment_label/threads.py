"""CPU thread placement of the pipeline's stages.

The backbone's big matrix products use every torch intra-op thread well. The stages after
it (graph, eigensolver, IPO, upsampling) are hundreds of small kernels; spread over several
threads each kernel ends in a barrier, and on a busy or small machine (decode threads,
other processes) one descheduled thread stalls them all. Run single-threaded they are
several times faster there, and the other cores stay free for decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_KERNEL_THREADS = 1


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
