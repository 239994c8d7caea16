"""The figure helpers every notebook uses: one look for all of them."""

from __future__ import annotations

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
