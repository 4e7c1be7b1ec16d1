"""Progress bars for every command: tqdm on a terminal; on a file or a pipe (a log), one plain line
every `LOG_INTERVAL_S` seconds and at the end, with no carriage returns or cursor moves.

    for item in progress_bar(items, desc="evaluating", unit="image"): ...
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class progress_bar(tqdm):  # noqa: N801 (used like tqdm, a callable that makes a bar)
    """tqdm, line-based when its stream is not a terminal."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        isatty = getattr(stream, "isatty", None)
        self.as_lines = not (isatty is not None and isatty())
        self.final_line = kwargs.get("leave", True) is not False
        self.shown_count = None
        if self.as_lines:
            kwargs.setdefault("mininterval", LOG_INTERVAL_S)
            kwargs.update(ascii=True, leave=False)  # the last line is written by close()
            kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.as_lines:
            return super().display(msg, pos)
        if msg == "":
            return False  # tqdm clearing the bar: there is nothing to clear in a log
        if msg is None and self.n == self.shown_count:
            return True  # nothing new since the last line
        self.shown_count = self.n
        self.fp.write((msg if msg is not None else str(self)) + "\n")
        self.fp.flush()
        return True

    def close(self):
        if self.as_lines and not self.disable and self.final_line:
            self.display()
        super().close()

    def clear(self, nolock=False):
        if not self.as_lines:
            super().clear(nolock)

    def moveto(self, n):
        if not self.as_lines:
            super().moveto(n)
