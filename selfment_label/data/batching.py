"""Feeding the backbone: decode in background threads, batch by patch grid, stack pixels."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from .images import DecodedImage

T = TypeVar("T")
R = TypeVar("R")


def lookahead(batch_size: int) -> int:
    """How many images may wait decoded ahead of the backbone: two batches, at least four (the
    ``depth`` of ``prefetch`` and the ``window`` of ``batches_by_grid``)."""
    return max(4, 2 * batch_size)


def prefetch(
    items: Iterable[T], work: Callable[[T], R], workers: int = 2, depth: int = 8
) -> Iterator[tuple[T, R | BaseException]]:
    """Run ``work`` over ``items`` in background threads, yielding results in order.

    At most ``depth`` results are in flight, so memory does not grow with the input.
    An exception raised by ``work`` is yielded in place of its result.
    """
    pending: deque[tuple[T, Future[R]]] = deque()
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        for item in iterator:
            pending.append((item, pool.submit(work, item)))
            if len(pending) >= depth:
                yield _settle(*pending.popleft())
        while pending:
            yield _settle(*pending.popleft())


def _settle(item: T, future: Future[R]) -> tuple[T, R | BaseException]:
    try:
        return item, future.result()
    except Exception as error:  # surfaced to the caller, who records it as a skip
        return item, error


def batches_by_grid(
    stream: Iterable[tuple[str, DecodedImage | BaseException]], batch_size: int, window: int
) -> Iterator[tuple[list[DecodedImage], list[tuple[str, BaseException]]]]:
    """Group decoded images into batches of one patch grid.

    At most ``window`` images wait in buckets; when the window is full the fullest bucket
    goes, so memory stays bounded whatever the mix of sizes. Failed decodes are passed
    through at once as ``(file name, error)``.
    """
    buckets: dict[tuple[int, int], list[DecodedImage]] = {}
    waiting = 0
    for name, item in stream:
        if isinstance(item, BaseException):
            yield [], [(name, item)]
            continue
        bucket = buckets.setdefault(item.grid, [])
        bucket.append(item)
        waiting += 1
        if len(bucket) >= batch_size or waiting >= window:
            grid = (
                item.grid
                if len(bucket) >= batch_size
                else max(buckets, key=lambda g: len(buckets[g]))
            )
            ready = buckets.pop(grid)
            waiting -= len(ready)
            yield ready, []
    for ready in buckets.values():
        yield ready, []


def stack_pixels(batch: list[DecodedImage], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, 3, H, W]`` pixels of a batch of one patch grid, on ``device``."""
    return torch.from_numpy(np.stack([d.pixels for d in batch])).to(device)
