"""Concept diagrams: labelled boxes joined by arrows, drawn with matplotlib.

Several chapters open a topic with a picture of its parts (what a run records and where it goes,
which rows a split keeps together, the order in which a training bug is hunted). The pictures are
code, like every figure of the book, so they render the same in HTML, PDF and JupyterLab and
change in review like any other line.

    from _shared.diagram import draw
    fig = draw({"data": (0, 0, "data"), "model": (3, 0, "model")}, [("data", "model", "trains")])

Coordinates are in box units: a box is ``width`` wide and ``height`` high, centred on its point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

Box = tuple[float, float, str]  # x, y (centre), text ("\n" for more lines)
Arrow = tuple[str, str, str]  # from, to, label ("" for none)


def draw(boxes: Mapping[str, Box], arrows: Sequence[Arrow] = (), *, width: float = 2.2,
         height: float = 0.9, size: tuple[float, float] = (8, 3), colors: Mapping[str, str] | None = None,
         title: str | None = None):
    """A figure with one rounded box per entry of ``boxes`` and one arrow per ``(from, to, label)``.

    ``colors`` maps box names to face colours (default: light grey). Arrows run between box edges,
    not centres, and their labels sit at the arrow's middle. Raises ``KeyError`` naming an arrow
    whose end is not a box, so a typo fails instead of drawing an arrow into nowhere.
    """
    for start, end, _ in arrows:
        for name in (start, end):
            if name not in boxes:
                raise KeyError(f"arrow {start!r} -> {end!r}: no box named {name!r}; boxes are {sorted(boxes)}")
    colors = colors or {}
    fig, ax = plt.subplots(figsize=size)
    for name, (x, y, text) in boxes.items():
        ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.2,
                                    edgecolor="0.25", facecolor=colors.get(name, "0.93"), zorder=2))
        ax.text(x, y, text, ha="center", va="center", fontsize=9, zorder=3, color="0.1")
    for start, end, label in arrows:
        (x0, y0, _), (x1, y1, _) = boxes[start], boxes[end]
        dx, dy = x1 - x0, y1 - y0
        # leave each box at its edge: scale the centre-to-centre vector to the box's half-extent
        scale = max(abs(dx) / (width / 2 + 0.08), abs(dy) / (height / 2 + 0.08), 1e-9)
        sx, sy = dx / scale, dy / scale
        ax.add_patch(FancyArrowPatch((x0 + sx, y0 + sy), (x1 - sx, y1 - sy), arrowstyle="-|>",
                                     mutation_scale=12, linewidth=1.1, color="0.3", zorder=1))
        if label:
            ax.text(x0 + dx / 2, y0 + dy / 2 + 0.12, label, ha="center", va="bottom", fontsize=8,
                    color="0.25", zorder=4, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    xs = [x for x, _, _ in boxes.values()]
    ys = [y for _, y, _ in boxes.values()]
    ax.set_xlim(min(xs) - width / 2 - 0.2, max(xs) + width / 2 + 0.2)
    ax.set_ylim(min(ys) - height / 2 - 0.2, max(ys) + height / 2 + 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
