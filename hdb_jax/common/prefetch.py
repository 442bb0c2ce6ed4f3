"""Background preparation of training batches.

Host-side batch work (rendering synthetic faces, decoding photos, tokenising) runs in one
background thread while the accelerator (or XLA's CPU threads) runs the step: a dispatched jitted
step releases the GIL, so the two overlap. Batches stay a pure function of their step, so the
order and content of what the loop sees do not depend on timing.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def prefetch(make: Callable[[int], T], steps: Iterable[int], depth: int = 2) -> Iterator[T]:
    """Yields ``make(step)`` for each step in order, preparing up to ``depth`` steps ahead.

    Args:
      make: a pure function of the step (it runs in a background thread).
      steps: the steps to prepare, in the order they are consumed.
      depth: how many batches may be ready or in preparation at once (>= 1).

    Returns:
      An iterator of batches; an exception raised by ``make`` is re-raised at its step.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    steps = iter(steps)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending: collections.deque = collections.deque()
        for step in steps:
            pending.append(pool.submit(make, step))
            if len(pending) >= depth:
                break
        while pending:
            ready = pending.popleft()
            step = next(steps, None)
            if step is not None:
                pending.append(pool.submit(make, step))
            yield ready.result()
