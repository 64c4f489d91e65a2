"""The one colour palette of napari-masam: label ``i``, class ``i`` and box object ``i`` share it.

Headless (numpy only). Every place that colours a label (model class colours, box-mode object
colours, prompt rectangles, napari colormaps, overlay videos) asks this module, so a prompt
rectangle of object ``k`` has the colour of label ``k``.

The colours are the 20 distinct colours of Sasha Trubetskoy's "List of 20 simple, distinct
colors" (red, green, yellow, blue, ...); labels beyond 20 cycle through them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PALETTE", "hex_to_rgb", "label_color", "label_colors", "label_rgb_table"]

#: ``#rrggbb`` colours of labels 1, 2, ... (label ``i`` gets ``PALETTE[(i - 1) % 20]``).
PALETTE: tuple[str, ...] = (
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#808080",
)


def label_color(label: int) -> str:
    """``#rrggbb`` colour of label (class, object id) ``label`` >= 1; cycles the palette.

    Raises
    ------
    ValueError
        For ``label < 1`` (0 is the background and has no colour).
    """
    label = int(label)
    if label < 1:
        raise ValueError(f"label colours start at label 1 (0 is background); got {label}")
    return PALETTE[(label - 1) % len(PALETTE)]


def label_colors(n: int) -> tuple[str, ...]:
    """``#rrggbb`` colours of labels ``1..n`` (``n`` entries; empty for ``n <= 0``)."""
    return tuple(label_color(i) for i in range(1, int(n) + 1))


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` (or ``"rrggbb"``) -> ``(r, g, b)`` integers in 0..255."""
    text = color.lstrip("#")
    if len(text) < 6:
        raise ValueError(f"expected a '#rrggbb' colour, got {color!r}")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def label_rgb_table(n: int) -> np.ndarray:
    """``(n + 1, 3)`` uint8 RGB lookup table: row 0 (background) black, row ``i`` label ``i``."""
    table = np.zeros((max(int(n), 0) + 1, 3), dtype=np.uint8)
    for i in range(1, len(table)):
        table[i] = hex_to_rgb(label_color(i))
    return table
