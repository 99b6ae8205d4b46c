import ctypes

import pytest
import torch

from qlab.core import peak_rss
from qlab.core.peak_rss import PeakRss

BLOCK = 256 * 2**20


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel, so that a new block is new resident memory: glibc serves a
    large allocation from a free chunk of its heap when one fits (earlier tests' freed tensors leave some), and
    then the block's pages are resident already and no peak appears (CI failed so on a fresh clone)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator is not the one these tests know
        pass


def transient_allocation(size: int = BLOCK) -> None:
    release_free_heap()
    block = torch.ones(size // 4)  # touched, so resident
    block.add_(1)
    del block


needs_mark = pytest.mark.skipif(peak_rss.high_water_mark() is None or not peak_rss._reset_high_water_mark(),
                                reason="this kernel keeps no resettable peak resident set")


@needs_mark
def test_a_short_allocation_is_seen_exactly():
    stretch = PeakRss().start()
    assert stretch.exact
    transient_allocation()
    # The peak is the block itself (the allocator may keep a few MB more), though no sampler ran at all.
    assert BLOCK * 0.95 < stretch.stop() < BLOCK * 1.25


@needs_mark
def test_a_stretch_started_inside_another_does_not_hide_the_outer_peak():
    outer = PeakRss().start()
    transient_allocation()
    inner = PeakRss().start()  # resets the kernel's mark: the outer stretch's peak must survive it
    transient_allocation(BLOCK // 4)
    assert inner.stop() < BLOCK * 0.5
    assert outer.stop() > BLOCK * 0.95


def test_without_a_resettable_mark_it_falls_back_to_sampling(monkeypatch):
    monkeypatch.setattr(peak_rss, "_reset_high_water_mark", lambda: False)
    release_free_heap()
    stretch = PeakRss().start()
    assert not stretch.exact
    block = torch.ones(BLOCK // 4)
    block.add_(1)
    stretch.observe()
    del block
    assert stretch.stop() > BLOCK * 0.95
