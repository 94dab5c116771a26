"""One progress line for long work (upscaling images or frames, training steps): drawn on a
terminal stream with ``\\r`` and redrawn at most a few times a second, silent on anything else
(a pipe, a log file), so that output captured by tools stays clean.

>>> bar = Progress(14, unit="image")
>>> bar.advance(pixels=1920 * 1080)      # one more done; shows images/s and megapixels/s
>>> bar.message("skipped a.png")         # a line above the bar
>>> bar.close()
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

BAR_WIDTH = 24
"""Characters of the ``[####....]`` part."""


class Progress:
    """A one-line progress bar: ``[#####...] done/total  rate unit/s  MP/s  label detail``.

    total: the number of units expected (None or 0 when unknown: no bar, just the count).
    unit: what is counted ("image", "frame", "step"), used in the rate.
    stream: where to draw (default sys.stderr); enabled: draw even when the stream is not a
    terminal (default: only on a terminal). Messages are printed in any case.
    min_interval: seconds between redraws (``force=True`` redraws at once).

    Rates are measured from the first :meth:`advance` (or construction) to now: units per
    second and, when :meth:`advance` is given pixel counts, megapixels per second. Thread-safe.
    """

    def __init__(self, total: int | None, *, unit: str = "image", stream: TextIO | None = None,
                 enabled: bool | None = None, min_interval: float = 0.2) -> None:
        self.total = total or 0
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = isatty if enabled is None else enabled
        self.min_interval = min_interval
        self.done = 0
        self.pixels = 0
        self.label = ""
        self.detail = ""
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._lock = threading.RLock()

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / max(self.elapsed, 1e-9)

    @property
    def megapixels_per_second(self) -> float:
        """Megapixels (as counted by :meth:`advance`) per second so far."""
        return self.pixels / 1e6 / max(self.elapsed, 1e-9)

    def line(self) -> str:
        """The text of the bar as it would be drawn now."""
        parts = []
        if self.total:
            filled = BAR_WIDTH * min(self.done, self.total) // self.total
            parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total}")
        else:
            parts.append(f"{self.done} {self.unit}s")
        if self.done:
            parts.append(f"{self.rate:.2f} {self.unit}s/s")
            if self.pixels:
                parts.append(f"{self.megapixels_per_second:.2f} MP/s")
        if self.label or self.detail:
            parts.append(f"{self.label}{self.detail}")
        return "  ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + self.line()[:max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()

    def update(self, done: int | None = None, text: str | None = None, *,
               force: bool = False) -> None:
        """Set the count to ``done`` and/or the label to ``text``, and redraw."""
        with self._lock:
            if done is not None:
                self.done = done
            if text is not None:
                self.label, self.detail = text, ""
            self._draw(force)

    def advance(self, count: int = 1, *, pixels: int = 0, label: str | None = None) -> None:
        """``count`` more units done, holding ``pixels`` pixels (for the MP/s rate)."""
        with self._lock:
            self.done += count
            self.pixels += pixels
            if label is not None:
                self.label = label
            self.detail = ""
            self._draw(force=self.total > 0 and self.done >= self.total)

    def set_detail(self, text: str) -> None:
        """Text shown after the label (e.g. "tile 3/12"), until the next :meth:`advance`."""
        with self._lock:
            self.detail = text
            self._draw()

    def message(self, text: str) -> None:
        """Print a line of text above the bar (the bar is redrawn below it)."""
        with self._lock:
            if self.enabled:
                self.stream.write("\r\x1b[K")
            print(text, file=self.stream, flush=True)
            self._draw(force=True)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        with self._lock:
            if self.enabled:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def summary(self) -> str:
        """``"N units in S s (R units/s, M MP/s)"``."""
        text = f"{self.done} {self.unit}{'s' if self.done != 1 else ''} in {self.elapsed:.1f} s"
        if self.done:
            text += f" ({self.rate:.2f} {self.unit}s/s"
            text += f", {self.megapixels_per_second:.2f} MP/s)" if self.pixels else ")"
        return text
