"""Progress bars for the commands' long work (`upload`, `report`).

A bar belongs on a person's terminal: it is drawn on stderr and only when stderr is a TTY, so a log file, a pipe
or CI gets the commands' plain lines and no carriage-return noise. tqdm draws it (imported here, when a bar is
made, never when `hy3d_pipeline` is imported).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO

# report: a bar only for work that lasts; a short report prints its one line and no bar flickers past
REPORT_DELAY_S = 1.0


def on_terminal(stream: IO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def _size(stream: IO) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError):
        return 0, 0


class Bar:
    """One bar, safe to advance from several threads. Disabled (every call a no-op) off a terminal."""

    def __init__(self, total: float, desc: str, *, unit: str = "it", unit_scale: bool = False, delay: float = 0.0,
                 stream: IO | None = None) -> None:
        stream = stream if stream is not None else sys.stderr
        self.enabled = on_terminal(stream)
        self._lock = threading.Lock()
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            # a terminal that reports no size (a bare pty, `script`) gets no bar at all from tqdm: 80x24 then
            sized = min(_size(stream)) > 0
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                             unit_divisor=1024 if unit_scale else 1000, delay=delay, file=stream,
                             dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24,
                             leave=False)

    def advance(self, amount: float = 1) -> None:
        if self._bar is not None and amount:
            with self._lock:
                self._bar.update(amount)

    def write(self, line: str, stream: IO | None = None) -> None:
        """Print a line above the bar (plain print when there is none)."""
        stream = stream if stream is not None else sys.stdout
        if self._bar is None:
            print(line, file=stream, flush=True)
            return
        with self._lock:
            self._bar.write(line, file=stream)

    def close(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
