"""Progress bars that a saved notebook can still show without its kernel.

tqdm.auto draws a widget in a notebook; saved, it shows "Error displaying widget: model not found" once the
kernel is gone. `bar` is tqdm writing one plain-text output, replaced in place, in a notebook (a terminal gets
tqdm's own bar on stderr): text reads the same with or without a kernel.
"""

from __future__ import annotations

import io

from tqdm import tqdm


class TextLine(io.TextIOBase):
    """A file for tqdm in a notebook (`generate.progress`): the bar as one plain-text output, replaced in place
    (`display_id`). Plain text, not tqdm.notebook's widget: a widget saved in a notebook shows "Error displaying
    widget: model not found" once its kernel is gone, even closed (leave=False); text reads the same with or
    without a kernel."""

    def __init__(self) -> None:
        self.handle = None  # IPython.display.DisplayHandle, once the bar has been shown

    def write(self, text: str) -> int:
        line = text.rsplit("\r", 1)[-1].strip()  # tqdm writes "\r" + the whole bar each time
        if line:
            self.show(line)
        return len(text)

    def show(self, line: str) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display({"text/plain": line}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": line}, raw=True)

    def flush(self) -> None:
        pass


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (whose outputs are saved in a notebook), not a terminal."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def bar(iterable=None, **kwargs) -> tqdm:
    """tqdm, as one plain-text line in a notebook (`TextLine`) and tqdm's own bar elsewhere; `kwargs`: tqdm's."""
    if in_notebook() and "file" not in kwargs:
        kwargs = {"file": TextLine(), **kwargs}
    if isinstance(kwargs.get("file"), TextLine):
        # miniters=1: tqdm's monitor thread never redraws the bar from outside the kernel's thread
        kwargs = {"miniters": 1, **kwargs}
    return tqdm(iterable, **kwargs)
