"""Progress of long checks: a live bar where someone watches, a periodic line in logs.

* On a terminal (stderr is a TTY and ``CI`` is unset) or in a notebook, a check that has
  already run for ``delay`` seconds draws a bar with an ETA: ``tqdm.auto`` when tqdm is
  installed (a widget in Jupyter), else a one-line bar of its own.
* Anywhere else (a pipe, a log file, CI), a check that runs longer than ``LOG_EVERY``
  seconds writes one line every ``LOG_EVERY`` seconds: ``jgc.check: 35% (1200/3400
  evaluations), 12 s, about 22 s left``.

Short checks, and so tests, never see either. ``JGC_PROGRESS=0`` turns both off,
``JGC_PROGRESS=1`` forces the live bar (even on a non-terminal).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

# Show the bar only for checks that have already taken this long: shorter ones finish
# before a bar would be useful, and a bar that flashes for 0.3 s is just noise.
DEFAULT_DELAY = 2.0
# Redraw at most this often (seconds): cheap, and readable.
REDRAW = 0.1
# Where no one watches a bar (logs, pipes, CI): one line this often (seconds), so a
# long check shows it is alive and how far it is without flooding the log.
LOG_EVERY = 10.0


def _forced() -> bool | None:
    force = os.environ.get("JGC_PROGRESS", "").strip().lower()
    if force in ("0", "false", "no", "off"):
        return False
    if force in ("1", "true", "yes", "on"):
        return True
    return None


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001 - any IPython oddity: not a notebook
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def enabled(stream=None) -> bool:
    """Whether a live progress bar should be drawn on ``stream`` (default stderr)."""
    force = _forced()
    if force is not None:
        return force
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    if stream is None and _in_notebook():
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except Exception:  # noqa: BLE001 - not installed (or broken): the built-in bar
        return None
    return tqdm


@dataclasses.dataclass
class Counter:
    """Counts cost evaluations (the lecture's price of a numerical gradient).

    ``progress`` is an optional callable ``progress(done)`` invoked as results arrive
    (see :class:`Progress`).
    """

    evaluations: int = 0
    progress: Callable | None = None

    def add(self, n: int) -> None:
        self.evaluations += int(n)
        if self.progress is not None:
            self.progress(self.evaluations)


class Progress:
    """Callable ``progress(done)``: a live bar (``tqdm`` or ``label [#####  ] 42% done/total``)
    on a terminal, a line every ``LOG_EVERY`` seconds elsewhere, nothing when turned off.

    Use as a context manager; ``close()`` clears the bar it drew.
    """

    def __init__(self, total: int, label: str = "jgc", *, stream=None, delay: float = DEFAULT_DELAY,
                 width: int = 30, clock=time.monotonic, log_every: float = LOG_EVERY):
        self.total = max(1, int(total))
        self.label, self.width, self.delay, self.clock = label, width, delay, clock
        self.log_every = log_every
        self.stream = sys.stderr if stream is None else stream
        self.active = enabled(stream)
        self.logging = not self.active and _forced() is None
        self.t0 = clock()
        self._last = -1.0
        self._logged = 0.0
        self.drawn = False
        self._bar = None

    def __call__(self, done: int) -> None:
        if not (self.active or self.logging):
            return
        now = self.clock()
        elapsed = now - self.t0
        frac = min(1.0, done / self.total)
        if self.logging:
            if elapsed - self._logged >= self.log_every:
                self._logged = elapsed
                eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
                left = f", about {eta:.0f} s left" if 0 < frac < 1 else ""
                self.stream.write(f"{self.label}: {frac:.0%} ({done}/{self.total} evaluations), "
                                  f"{elapsed:.0f} s{left}\n")
                self.stream.flush()
            return
        if elapsed < self.delay or now - self._last < REDRAW:
            return
        self._last = now
        tqdm = _tqdm()
        if tqdm is not None:
            if self._bar is None:
                self._bar = tqdm(total=self.total, desc=self.label, unit="eval", file=self.stream,
                                 leave=False, dynamic_ncols=True)
            self._bar.update(max(0, min(done, self.total) - self._bar.n))
            self._bar.refresh()  # redrawn at our pace (REDRAW), not tqdm's
            self.drawn = True
            return
        fill = round(frac * self.width)
        bar = "#" * fill + " " * (self.width - fill)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        tail = f" eta {eta:.0f}s" if 0 < frac < 1 else ""
        self.stream.write(f"\r{self.label} [{bar}] {frac:4.0%} {done}/{self.total} evals {elapsed:.1f}s{tail}  ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.drawn = False
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
        if self.bar.active or self.bar.logging:
            self.counter.progress = lambda n: self.bar(n - self.start)
        return self.bar

    def __exit__(self, *exc):
        self.counter.progress = None
        self.bar.close()
        return False
