"""Progress bars (tqdm) that show on every terminal, sized or not.

tqdm sizes its bar from the terminal's reported size. A pseudo-terminal nobody has sized reports 0 columns by 0
rows (`script` or `ssh -t` run without a terminal of their own, `docker exec -t`, Python's `pty`, many CI and
notebook runners); tqdm then takes the bar's last line as row -1 and draws nothing at all, with or without
--progress. `bar()` gives such a terminal the size of COLUMNS / LINES, else 80x24."""

from __future__ import annotations

import os
import shutil
import sys


def terminal_shape(stream) -> dict:
    """tqdm's ncols / nrows for `stream` when it is a terminal that reports no size; {} otherwise (tqdm's own
    sizing: the terminal's size, or none for a file or pipe)."""
    try:
        cols, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a terminal, no file descriptor, a closed stream
        return {}
    if cols > 0 and lines > 0:
        return {}
    cols, lines = shutil.get_terminal_size()  # COLUMNS / LINES when set, else 80x24 (or stdout's size)
    return {"ncols": max(cols, 20) - 1, "nrows": max(lines, 2) - 1}  # tqdm's own convention: one less


def bar(*, total: int, desc: str, enabled: bool | None = None, file=None, **kw):
    """A tqdm bar on `file` (default stderr): `enabled` True / False force it on / off, None shows it when `file`
    is a terminal."""
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    return tqdm(total=total, desc=desc, file=file, disable=None if enabled is None else not enabled,
                **terminal_shape(file), **kw)
