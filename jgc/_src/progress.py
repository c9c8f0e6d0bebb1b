"""A tiny progress bar on stderr for long checks (no dependency).

It stays silent unless stderr is a terminal, the environment variable ``CI`` is unset
(or empty/"0"/"false") and the check has already run for ``delay`` seconds, so short
checks, tests, pipes and CI logs never see it. ``JGC_PROGRESS=0`` turns it off,
``JGC_PROGRESS=1`` forces it on (even on a non-terminal).
"""

from __future__ import annotations

import os
import sys
import time

# Show the bar only for checks that have already taken this long: shorter ones finish
# before a bar would be useful, and a bar that flashes for 0.3 s is just noise.
DEFAULT_DELAY = 2.0
# Redraw at most this often (seconds): cheap, and readable.
REDRAW = 0.1


def enabled(stream=None) -> bool:
    """Whether a progress bar should be drawn on ``stream`` (default stderr)."""
    force = os.environ.get("JGC_PROGRESS", "").strip().lower()
    if force in ("0", "false", "no", "off"):
        return False
    if force in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Callable ``progress(done)`` that draws ``label [#####     ] 42% done/total 3.1s``.

    Use as a context manager; ``close()`` clears the line it drew.
    """

    def __init__(self, total: int, label: str = "jgc", *, stream=None, delay: float = DEFAULT_DELAY,
                 width: int = 30, clock=time.monotonic):
        self.total = max(1, int(total))
        self.label, self.width, self.delay, self.clock = label, width, delay, clock
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled(self.stream)
        self.t0 = clock()
        self._last = -1.0
        self.drawn = False

    def __call__(self, done: int) -> None:
        if not self.active:
            return
        now = self.clock()
        elapsed = now - self.t0
        if elapsed < self.delay or now - self._last < REDRAW:
            return
        self._last = now
        frac = min(1.0, done / self.total)
        fill = round(frac * self.width)
        bar = "#" * fill + " " * (self.width - fill)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        tail = f" eta {eta:.0f}s" if 0 < frac < 1 else ""
        self.stream.write(f"\r{self.label} [{bar}] {frac:4.0%} {done}/{self.total} evals {elapsed:.1f}s{tail}  ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * (len(self.label) + self.width + 60) + "\r")
            self.stream.flush()
            self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class attached:
    """Context manager: draw progress of ``counter`` toward ``counter.evaluations + total``."""

    def __init__(self, counter, total: int, label: str = "jgc.check"):
        self.counter, self.start = counter, counter.evaluations
        self.bar = Progress(total, label)

    def __enter__(self):
        if self.bar.active:
            self.counter.progress = lambda n: self.bar(n - self.start)
        return self.bar

    def __exit__(self, *exc):
        self.counter.progress = None
        self.bar.close()
        return False
