"""Interactive panels for the notebooks (ipywidgets): move a knob, watch the images change."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt

from .generate import edit, real_number, vary
from .images import as_rgb_images
from .lab import Lab
from .plots import show_images


SIZE = 1.6  # inches per image, as show_images draws them


def _show(images, title: str) -> None:
    show_images(images, suptitle=title, size=SIZE)
    plt.show()


def _panel(show, **controls):
    """The controls above one output area that keeps its height while it redraws (the page does not jump when
    a knob moves) and labels that are never cut off. `show(**values)` draws one figure. Displays the panel
    (end the cell with `;`, as with `ipywidgets.interact`) and returns it."""
    import ipywidgets as w
    from IPython.display import display

    for control in controls.values():
        control.style.description_width = "initial"
    out = w.interactive_output(show, controls)
    out.layout.min_height = f"{int(100 * (SIZE + 0.4)) + 30}px"  # one row of images and a title, at 100 dpi
    panel = w.VBox([w.HBox(list(controls.values()), layout=w.Layout(flex_flow="row wrap")), out])
    display(panel)
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
    """Variations of `image` with the norm of Eq. 6 scaled by a factor, in either convention."""
    import ipywidgets as w

    def show(scale, convention):
        base = lab.norm if convention == "c" else lab.norm_t
        _show(vary(lab, image, n=n, seed=seed, norm=base * scale, norm_space=convention),
              f"norm = {scale:g} x {base:.3g} ({'paper, C-space' if convention == 'c' else 'public code, T-space'})")

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
        _show([image, *edit(lab, image, text, alpha=alpha, n=n, seed=seed)], f"'{text}', alpha {alpha:.2f}")

    longest = max(map(len, references), default=10)
    return _panel(show, reference=w.Dropdown(options=list(references), description="reference",
                                             layout=w.Layout(width=f"min(100%, {longest + 14}ch)")),
                  text=w.Text(value="a blue disk", description="edit text", continuous_update=False),
                  alpha=w.FloatSlider(value=0.9, min=0.0, max=2.0, step=0.1, description="alpha"),
                  seed=w.IntSlider(value=0, min=0, max=20, description="seed"))
