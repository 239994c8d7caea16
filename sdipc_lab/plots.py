"""The figure helpers every notebook uses: one look for all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt


def show_images(images: Sequence, titles: Sequence[str] | None = None, *, ncols: int | None = None,
                size: float = 1.6, suptitle: str | None = None, row_labels: Sequence[str] | None = None):
    """A grid of PIL images with optional titles (one per image) and row labels; returns the figure."""
    images = list(images)
    ncols = ncols or len(images)
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < len(images):
            ax.imshow(images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if row_labels is not None:
        for ax, label in zip(axes[:, 0], row_labels):
            ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def escape(text: str) -> str:
    """Text for a Markdown table cell: `|` (as in ||z||) would end the cell, a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


class Table:
    """Rows of dicts shown as a Markdown table in a notebook (and as text with print)."""

    def __init__(self, rows: Sequence[dict], digits: int = 3):
        self.rows, self.digits = list(rows), digits

    def _cell(self, value) -> str:
        if isinstance(value, float):
            return f"{value:.{self.digits}g}" if abs(value) >= 1 or value == 0 else f"{value:.{self.digits}f}"
        return escape(str(value))

    def __str__(self) -> str:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        lines = ["| " + " | ".join(map(escape, columns)) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(self._cell(row.get(c, "")) for c in columns) + " |" for row in self.rows]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return str(self)


def table(rows: Sequence[dict], digits: int = 3) -> Table:
    return Table(rows, digits)


VERDICTS = ("reproduced", "not reproduced here", "opposite here", "information", "not measured here")


def verdict(effect: float | None, margin: float = 0.0, *, opposite: bool = True, ties: bool = False) -> str:
    """A claim's verdict from its measured effect, signed so that positive is the paper's direction: "reproduced"
    above `margin`, "opposite here" below -`margin`, "not reproduced here" between; None is "information";
    NaN is "not measured here" (a column this lab has no measure for: the toy judge's, on SD; see
    `datasets.measured`).
    `opposite=False` for claims of the kind "within a tolerance", which have no opposite: a miss is "not
    reproduced here". `ties=True` for claims of the kind "A matches B", which a tie satisfies: "reproduced"
    from -`margin` up, "opposite here" below it."""
    if effect is None:
        return "information"
    if math.isnan(effect):
        return "not measured here"
    if not math.isfinite(effect):
        raise ValueError(f"a claim's effect must be a finite number, got {effect}")
    if effect > margin or (ties and effect >= -margin):
        return "reproduced"
    return "opposite here" if effect < -margin and opposite else "not reproduced here"


def claims(rows: Sequence[dict]) -> Table:
    """A claims table: each row's "claim", "paper" and "measured here", and a "verdict" computed by `verdict`
    from its "effect", "margin", "opposite" and "ties" (never typed by hand)."""
    out = []
    for row in rows:
        row = dict(row)
        effect, margin = row.pop("effect", None), row.pop("margin", 0.0)
        opposite, ties = row.pop("opposite", True), row.pop("ties", False)
        out.append({**row, "verdict": verdict(effect, margin, opposite=opposite, ties=ties)})
    return Table(out)


def check_verdicts(table: Table, expected: dict) -> None:
    """Fail (AssertionError) when a claim's verdict is not the one this lab is known to show: a retrained lab or a
    changed experiment that flips a verdict must be looked at, and the text beside the table rewritten."""
    got = {row["claim"]: row["verdict"] for row in table.rows}
    wrong = {claim: (want, got.get(claim)) for claim, want in expected.items() if got.get(claim) != want}
    assert not wrong, "verdicts changed (expected, got): " + "; ".join(f"{c!r}: {w}" for c, w in wrong.items())


def plot_curves(rows: Sequence[dict], x: str, ys: Sequence[str], *, logx: bool = False, title: str = "",
                ylabel: str = ""):
    """One line per column `ys` against column `x`; returns the figure. Columns the rows do not have (the judge's,
    on a lab without one) are named under the plot as not measured; with none left, that is printed instead and
    None is returned."""
    missing = [y for y in ys if not rows or y not in rows[0]]
    ys = [y for y in ys if y not in missing]
    if not ys:
        print(f"{title or 'plot'}: nothing to draw, not measured on this lab: {', '.join(missing)}")
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for y in ys:
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=y)
    if logx:
        ax.set_xscale("symlog", linthresh=1e-2)
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if missing:
        fig.text(0.01, 0.01, "not measured on this lab: " + ", ".join(missing), fontsize=6, color="0.4")
    fig.tight_layout()
    return fig


def plot_groups(rows: Sequence[dict], x: str, ys: Sequence[str], group: str, *, title: str = "", ylabel: str = "",
                styles: Sequence[str] = ("-", "--", ":"), chance: float | None = None):
    """One line per (value of column `group`, column of `ys`) against column `x`: a colour per group, a line style
    per column; `chance`, a grey line at that accuracy (and the y axis from 0 to 1). Returns the figure, or None
    (saying so) when there are no rows (not measured on this lab)."""
    if not rows:
        print(f"{title or 'plot'}: nothing to draw, not measured on this lab")
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, name in enumerate(dict.fromkeys(r[group] for r in rows)):
        mine = [r for r in rows if r[group] == name]
        for y, style in zip(ys, styles):
            ax.plot([r[x] for r in mine], [r[y] for r in mine], style, marker="o", color=f"C{k}", label=f"{name}: {y}")
    if chance is not None:
        ax.axhline(chance, color="0.6", lw=1, ls=":", label="chance")
        ax.set_ylim(0, 1.03)
    ax.set(xlabel=x, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_spectrum(singular_values, cutoff: float | None = None, title: str = "singular values of W_t"):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(range(1, len(singular_values) + 1), singular_values, marker=".", lw=1)
    if cutoff is not None:
        ax.axhline(cutoff, color="C3", ls="--", label=f"cutoff {cutoff:g}: rank {(singular_values > cutoff).sum()}")
        ax.legend(fontsize=8)
    ax.set(xlabel="index", ylabel="singular value", title=title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_token_maps(maps, tokens: Sequence[str], image=None, *, size: float = 1.3):
    """Cross-attention map per token (T, h, w) beside the generated image; returns the figure."""
    n = len(tokens) + (image is not None)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size * 1.25), squeeze=False)
    axes = axes[0]
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=8)
        axes = axes[1:]
    for ax, m, token in zip(axes, maps, tokens):
        ax.imshow(m, cmap="magma")
        ax.set_title(token, fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_histograms(values: dict, bins: int = 30, title: str = ""):
    fig, axes = plt.subplots(1, len(values), figsize=(4 * len(values), 2.8), squeeze=False)
    for ax, (name, v) in zip(axes[0], values.items()):
        ax.hist(v, bins=bins, color="C0", alpha=0.8)
        ax.axvline(float(v.mean()), color="C3", ls="--", label=f"mean {v.mean():.3g} ± {v.std():.2g}")
        ax.set(title=name, xlabel="norm")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pipeline_diagram():
    """SD-IPC at a glance: the image path (CLIP image tower -> W_i -> W_t^+ -> 77-token pseudo-prompt) and the
    text path (text tower) both feeding the U-Net's cross-attention. Returns the figure."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 3.1))
    ax.set(xlim=(0, 10), ylim=(0, 3.1))
    ax.axis("off")
    boxes = {  # name: (x, y, text, colour)
        "image": (0.1, 2.1, "image x", "#dddddd"),
        "tower_i": (1.55, 2.1, "CLIP image\ntower", "#cfe2f3"),
        "W_i": (3.0, 2.1, "$W_i$\n$f^c_{img}$ (P)", "#cfe2f3"),
        "inverse": (4.45, 2.1, "$W_t^+$ (cutoff)\n× norm (Eq. 6)", "#f4cccc"),
        "prompt": (5.9, 2.1, "[sos, $f^{cnvrt}$×76]\n(77, D) Eq. 7", "#f4cccc"),
        "text": (0.1, 0.35, "text s", "#dddddd"),
        "tower_t": (1.55, 0.35, "CLIP text\ntower", "#d9ead3"),
        "states": (3.0, 0.35, "$f_{txt}$ (77, D)\nT-space", "#d9ead3"),
        "W_t": (4.45, 0.35, "$W_t$\n$f^c_{txt}$ (P)", "#d9ead3"),
        "unet": (7.75, 1.2, "U-Net\ncross-attention\n(reads 77 × D)", "#fff2cc"),
    }
    w, h = 1.25, 0.75
    for name, (x, y, text, colour) in boxes.items():
        height = 1.2 if name == "unet" else h
        ax.add_patch(FancyBboxPatch((x, y), w + (0.6 if name == "unet" else 0), height,
                                    boxstyle="round,pad=0.03", fc=colour, ec="#555555"))
        ax.text(x + (w + (0.6 if name == "unet" else 0)) / 2, y + height / 2, text, ha="center", va="center",
                fontsize=8)

    def arrow(a, b, label="", style="-|>"):
        (xa, ya), (xb, yb) = a, b
        ax.add_patch(FancyArrowPatch((xa, ya), (xb, yb), arrowstyle=style, mutation_scale=10, color="#333333"))
        if label:
            ax.text((xa + xb) / 2, (ya + yb) / 2 + 0.08, label, ha="center", fontsize=7, color="#333333")

    for left, right in (("image", "tower_i"), ("tower_i", "W_i"), ("W_i", "inverse"), ("inverse", "prompt"),
                        ("text", "tower_t"), ("tower_t", "states"), ("states", "W_t")):
        arrow((boxes[left][0] + w, boxes[left][1] + h / 2), (boxes[right][0], boxes[right][1] + h / 2))
    arrow((5.9 + w, 2.1 + h / 2), (7.75, 2.0))
    ax.text(7.3, 2.55, "pseudo-prompt as prompt_embeds", fontsize=7, color="#333333")
    # SD's usual path: the T-space states themselves, routed beneath W_t (which only CLIP's training uses)
    x0, low, x_unet = 3.0 + w / 2, 0.12, 7.75 + 0.9
    ax.plot([x0, x0, x_unet], [0.35, low, low], color="#333333", lw=1)
    arrow((x_unet, low), (x_unet, 1.2))
    ax.text(5.9, low + 0.06, "text states as prompt_embeds (SD's usual path)", fontsize=7, color="#333333")
    ax.add_patch(FancyArrowPatch((3.0 + w / 2, 2.1), (4.45 + w / 2, 0.35 + h), arrowstyle="<|-|>", ls="--",
                                 mutation_scale=9, color="#990000"))
    ax.text(4.6, 1.5, "contrastive training:\n$f^c_{img} \\approx f^c_{txt}$ (C-space)", ha="left", fontsize=7,
            color="#990000")
    fig.tight_layout()
    return fig
