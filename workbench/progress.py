"""One progress bar for every long step: tqdm's where it is wanted, a silent stand-in where not.

    with progress_bar(len(todo), "autotune", "op", enabled=progress) as bar:
        for item in todo:
            ...
            bar.update(1)

The bar closes when the block ends, also when it ends with an error or an interrupt.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class SilentBar:
    """What ``progress_bar`` yields when no bar is shown: the calls a bar takes, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackBar(SilentBar):
    """What ``progress_bar`` yields when ``enabled`` is a callable: each update calls it with (done, total, desc),
    so a widget can show the progress in its own status line (a tqdm bar from a button's callback has no cell
    to draw in)."""

    def __init__(self, total: int, desc: str, callback) -> None:
        self.total, self.desc, self.callback, self.n = total, desc, callback, 0
        callback(0, total, desc)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.callback(self.n, self.total, self.desc)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, *, enabled=True) -> Iterator:
    """A tqdm bar of ``total`` ``unit``s named ``desc`` (notebook or terminal, as tqdm.auto picks), or a
    ``SilentBar`` when ``enabled`` is false or there is nothing to do. ``enabled`` may also be a callable
    ``(done, total, desc)``, called at the start and at every update instead of drawing a bar (``CallbackBar``)."""
    if callable(enabled) and total:
        bar = CallbackBar(total, desc, enabled)
    elif enabled and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit)
    else:
        bar = SilentBar()
    try:
        yield bar
    finally:
        bar.close()
