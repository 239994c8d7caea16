"""Interactive panels for the notebooks (ipywidgets): move a knob, watch the images change.

A panel is three outputs of its cell: the controls (a widget), a one-line note and the figure. The figure is a
plain image output, replaced in place on each redraw (`display_id`), so a saved notebook keeps the last figure as
an image/png that any viewer shows, with or without a kernel. A widget lives only as long as its kernel: reopened
after the Jupyter server restarted, JupyterLab finds no model for the controls. The note, "run this cell to get
them back", is hidden while the controls are live and shown in their place once they are gone (the renderer's own
"Error displaying widget: model not found" line for them is hidden then; jupyterlab_widgets 3 draws it whatever
else the output holds, docs/results/jupyterlab_panels.md).

A knob moved while a figure is being drawn waits in the kernel's queue; redraws are debounced, so a burst of
moves draws once, for the controls' values when the burst ends, and the figure's title names those values.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import numbers
from collections.abc import Callable, Iterable, Sequence

import matplotlib.pyplot as plt

from .generate import edit, real_number, vary
from .images import as_rgb_images
from .lab import Lab
from .plots import show_images


SIZE = 1.6  # inches per image, as show_images draws them
DPI = 100  # the figure's pixels per inch: its size in pixels is fixed, so a redraw never moves the page
DEBOUNCE = 0.25  # seconds a panel waits after the last move before it draws
NOTE = "Interactive controls: run this cell to get them back."
_ids = itertools.count()


def _show(images, title: str) -> bytes:
    """One row of images under `title`, as PNG bytes of a fixed size (SIZE inches per image at DPI; tight_layout
    keeps the title and labels inside it), the title also in the PNG's metadata (what a figure shows can be read
    back: bench/jupyterlab_panels.py). The figure is closed: nothing is left for the inline backend to show."""
    fig = show_images(images, suptitle=title, size=SIZE)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Title": title})
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _note_html(panel_class: str) -> str:
    """The note shown where the controls were once they are gone. CSS on JupyterLab's output classes: while the
    output before it holds the live panel, the note is hidden; while that output holds no widget view (its model
    was not found), its error line is hidden and the note stands in its place."""
    child, note = ".jp-OutputArea-child", f"{panel_class}-note"
    return (f'<div class="{note}">{NOTE}</div><style>'
            f"{child}:has(.{panel_class}) + {child} .{note} {{display: none}} "
            f"{child}:has(+ {child} .{note}) .jupyter-widgets:not(:has(*)) {{display: none}}</style>")


class _Redraw:
    """Draws a panel's figure for its controls' current values, at most once per burst of moves.

    ipywidgets callbacks run in the kernel's one thread, one message at a time: while a figure is drawn, later
    moves wait in the queue, and each one, once handled, would draw in turn -- the figure lagging the slider by
    a whole queue. Instead a move (re)starts a timer on the kernel's event loop; when it fires, the figure is
    drawn for the controls' values at that moment, so moves that arrived meanwhile coalesce into one draw of
    the latest value, and a value already shown is not drawn again. Without a running event loop (a script, a
    test) it draws at once."""

    def __init__(self, draw: Callable[..., bytes], controls: dict, status, delay: float = DEBOUNCE):
        self.draw, self.controls, self.status, self.delay = draw, controls, status, delay
        self.handle = None  # the figure's display (IPython.display.DisplayHandle), None outside IPython
        self.shown = None  # the values the figure shows
        self._timer = None

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def request(self, change=None) -> None:
        """A control moved: draw after `delay` seconds without another move (at once without an event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.now()
            return
        if self._timer is not None:
            self._timer.cancel()
        self.status.value = "drawing..."
        self._timer = loop.call_later(self.delay, self.now)

    def now(self, *, quiet: bool = True) -> None:
        """Draw the figure for the controls' values now, unless it shows them already. An error is shown in the
        status line (`quiet`: a callback's traceback would go to the server's log, unseen) or raised."""
        from IPython.display import Image, display

        self._timer = None
        values = self.values()
        if values == self.shown:
            self.status.value = ""
            return
        self.status.value = "drawing..."
        try:
            image = Image(self.draw(**values), format="png")
        except Exception as error:
            if not quiet:
                raise
            self.status.value = f"could not draw {values}: {type(error).__name__}: {error}"[:300]
            return
        self.shown = values
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        self.status.value = ""


def _panel(draw: Callable[..., bytes], **controls):
    """Displays the controls, the note for a reopened notebook and the figure `draw(**values)` (PNG bytes) for
    the controls' values; redraws (debounced, `_Redraw`) when a control moves. Labels are never cut off.
    Returns the controls' box (end the cell with `;`, as with `ipywidgets.interact`)."""
    import ipywidgets as w
    from IPython.display import display

    for control in controls.values():
        control.style.description_width = "initial"
        if hasattr(control, "continuous_update"):  # a dragged slider sends its value once, where it is let go
            control.continuous_update = False
    status = w.Label(value="", layout=w.Layout(min_width="10ch"))
    panel = w.VBox([w.HBox([*controls.values(), status], layout=w.Layout(flex_flow="row wrap"))])
    panel_class = f"sdipc-lab-panel-{next(_ids)}"
    panel.add_class(panel_class)
    panel.redraw = redraw = _Redraw(draw, controls, status)
    for control in controls.values():
        control.observe(redraw.request, names="value")
    # text/plain empty: a viewer without the widget renderer (or an untrusted notebook) shows the note alone
    display({"text/plain": "", **{k: v for k, v in panel._repr_mimebundle_().items() if k != "text/plain"}},
            raw=True)
    display({"text/html": _note_html(panel_class), "text/plain": NOTE}, raw=True)
    redraw.now(quiet=False)  # the first figure, in the cell's run: an error is the cell's
    return panel


def _one_image(image, where: str) -> list:
    """`image` read as one RGB image (a PIL image, an array or a path), or a ValueError saying where it came from."""
    if isinstance(image, numbers.Number):
        raise ValueError(f"{where}: the image comes first, got the number {image!r}")
    images = as_rgb_images(image)
    if len(images) != 1:
        raise ValueError(f"{where}: one image, got {len(images)}")
    return images


def cutoff_slider(lab: Lab, image, cutoffs: Sequence[float] | None = None, *, n: int = 4, seed: int = 0):
    """Variations of `image` at the chosen singular-value cutoff (`cutoffs`; default 0, the lab's and 0.5)."""
    import ipywidgets as w

    [image] = _one_image(image, "cutoff_slider(lab, image, cutoffs)")
    if cutoffs is None:
        cutoffs = sorted({0.0, float(lab.cutoff), 0.5})
    if isinstance(cutoffs, (str, bytes)) or not isinstance(cutoffs, Iterable):
        raise ValueError(f"cutoffs must be a list of cutoffs the slider steps through, e.g. [0.0, lab.cutoff, 0.5], "
                         f"got {cutoffs!r}")
    cutoffs = [real_number("a cutoff", c) for c in cutoffs]
    if not cutoffs:
        raise ValueError("cutoffs is empty: give the cutoffs the slider steps through, e.g. [0.0, lab.cutoff, 0.5]")
    options = [(f"{c:.3g}", c) for c in cutoffs]
    value = min(cutoffs, key=lambda c: abs(c - lab.cutoff))
    return _panel(lambda cutoff: _show(vary(lab, image, n=n, seed=seed, cutoff=cutoff), f"cutoff {cutoff:.3g}"),
                  cutoff=w.SelectionSlider(options=options, value=value, description="cutoff"))


def norm_slider(lab: Lab, image, *, n: int = 4, seed: int = 0):
    """Variations of `image` with the norm of Eq. 6 scaled by a factor, in the paper's convention or the public
    code's (`convert.PUBLIC_CODE`)."""
    import ipywidgets as w

    def show(scale, convention):
        base = lab.norm if convention == "c" else lab.norm_t
        name = "paper, C-space" if convention == "c" else "public code, T-space"
        return _show(vary(lab, image, n=n, seed=seed, norm=base * scale, norm_space=convention),
                     f"norm = {scale:g} x {base:.3g} ({name})")

    return _panel(show, scale=w.FloatLogSlider(value=1.0, base=2, min=-3, max=3, step=0.5, description="scale"),
                  convention=w.ToggleButtons(options=[("paper (C)", "c"), ("public (T)", "t")], description="norm"))


def edit_panel(lab: Lab, references: dict, *, n: int = 4):
    """Pick a reference image, type an edit text, move alpha and the seed (Eq. 8)."""
    import ipywidgets as w

    if not isinstance(references, dict) or not references:
        raise ValueError("references must be a non-empty dict of name -> image, e.g. {'star': refs[0]}, got "
                         f"{references!r}"[:300])
    references = {str(name): _one_image(image, f"references[{name!r}]")[0] for name, image in references.items()}
    def show(reference, text, alpha, seed):
        image = references[reference]
        return _show([image, *edit(lab, image, text, alpha=alpha, n=n, seed=seed)],
                     f"'{text}', alpha {alpha:.2f}, seed {seed}")

    longest = max(map(len, references), default=10)
    return _panel(show, reference=w.Dropdown(options=list(references), description="reference",
                                             layout=w.Layout(width=f"min(100%, {longest + 14}ch)")),
                  text=w.Text(value="a blue disk", description="edit text", continuous_update=False),
                  alpha=w.FloatSlider(value=0.9, min=0.0, max=2.0, step=0.1, description="alpha"),
                  seed=w.IntSlider(value=0, min=0, max=20, description="seed"))
