from __future__ import annotations

import mmap

import numpy as np
import pytest

from qlab.core import peak_rss
from qlab.core.peak_rss import PeakRss

BLOCK = 256 * 2**20


class NewPages:
    """``size`` bytes of new resident memory while the block is open: a mapping of its own, every page written,
    unmapped at the end. A tensor would come from the allocator, which may serve it from pages it holds already
    (after earlier tests, glibc did so in CI: no peak appeared) or give them back without an unmap."""

    def __init__(self, size: int = BLOCK) -> None:
        self.size = size

    def __enter__(self) -> NewPages:
        self.mapping = mmap.mmap(-1, self.size)
        pages = np.frombuffer(self.mapping, dtype=np.uint8)
        pages[::mmap.PAGESIZE] = 1
        del pages  # the mapping cannot close while an array still looks into it
        return self

    def __exit__(self, *exc) -> None:
        self.mapping.close()


def transient_allocation(size: int = BLOCK) -> None:
    with NewPages(size):
        pass


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
    stretch = PeakRss().start()
    assert not stretch.exact
    with NewPages():
        stretch.observe()
    assert stretch.stop() > BLOCK * 0.95
