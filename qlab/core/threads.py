"""Run sequential loops of small tensor operations on one thread.

Each operation in such a loop (GPTQ's column updates, the QAT toy's steps, the K-quant scale search) is too
small to split across cores; the thread hand-offs cost more than the work, and on a loaded machine OpenMP's
waiting threads make it far worse (the QAT toy: 0.6 s on one thread against 20 s on two, measured while the
2-core machine ran other jobs). torch's thread count is process-wide, so it is restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Temporarily run torch's CPU kernels on a single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
