"""The process's peak resident memory over a stretch of code, exact where Linux allows it.

The kernel keeps a high-water mark of the resident set (``VmHWM``) that ``/proc/self/clear_refs`` can reset, so a
transient allocation of any duration is seen, unlike an RSS sampler. The mark is one per process while stretches
may overlap (a page measuring while another's job does): before a reset the mark reached so far is handed to every
stretch still open, so none of them loses a peak it had.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

_open: set[PeakRss] = set()
_lock = threading.Lock()


def high_water_mark() -> int | None:
    """The process's peak resident bytes since the last reset (Linux ``VmHWM``); None where it is not kept."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak to the current resident set
    except OSError:
        return False
    return True


class PeakRss:
    """``start()`` ... ``stop()``: the peak resident bytes in between. ``exact`` is False where the kernel's mark
    cannot be reset; the caller then has to sample (``observe``) and may miss short peaks."""

    def __init__(self) -> None:
        self.exact = False
        self.start_bytes = 0
        self.peak_bytes = 0

    def start(self) -> PeakRss:
        with _lock:
            mark = high_water_mark()
            for other in _open:
                other.peak_bytes = max(other.peak_bytes, mark or 0)
            self.exact = mark is not None and _reset_high_water_mark()
            self.start_bytes = self.peak_bytes = psutil.Process().memory_info().rss
            _open.add(self)
        return self

    def observe(self) -> None:
        """Take the current resident size into the peak (the sampling fallback)."""
        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)

    def peak(self) -> int:
        """The peak so far, in bytes (not above the start: absolute)."""
        with _lock:
            if self.exact:
                self.peak_bytes = max(self.peak_bytes, high_water_mark() or 0)
        self.observe()
        return self.peak_bytes

    def stop(self) -> int:
        """End the stretch; its peak in bytes above the resident size at ``start``."""
        peak = self.peak()
        with _lock:
            _open.discard(self)
        return max(0, peak - self.start_bytes)
