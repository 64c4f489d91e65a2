"""One label palette: a prompt rectangle of object k has the colour of label k everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from napari_masam import _layers, batch, inference, palette
from napari_masam.io.video import blend_labels

OBJECT_IDS = list(range(1, 46))  # past the palette's length: cycling must agree as well


def _rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> ints, written here independently of palette.hex_to_rgb."""
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@pytest.mark.parametrize("k", OBJECT_IDS)
def test_prompt_colour_of_object_k_is_its_label_colour(k: int) -> None:
    prompt = _layers.object_color(k)  # the rectangle's edge colour in the prompts layer
    label = inference.object_color(k)  # the colour box mode gives label k in its result
    assert prompt == label == palette.label_color(k)
    # the batch overlay video and the default blend colour label k the same way
    assert tuple(batch.label_palette((), max(OBJECT_IDS))[k]) == _rgb(label)
    frame = np.zeros((1, 1, 3), np.uint8)
    blended = blend_labels(frame, np.array([[k]]), alpha=1.0)
    assert tuple(blended[0, 0]) == _rgb(label)


def test_object_three_is_yellow_in_both_places() -> None:
    """The reviewer's case: object 3's rectangle was blue while its label was yellow."""
    assert _layers.object_color(3) == inference.object_color(3) == "#ffe119"


def test_palette_is_distinct_and_cycles() -> None:
    n = len(palette.PALETTE)
    assert len(set(palette.PALETTE)) == n
    assert palette.label_colors(n + 2) == (*palette.PALETTE, palette.PALETTE[0], palette.PALETTE[1])
    table = palette.label_rgb_table(n)
    assert table.shape == (n + 1, 3) and table.dtype == np.uint8
    assert tuple(table[0]) == (0, 0, 0)
    assert [tuple(int(v) for v in row) for row in table[1:]] == [_rgb(c) for c in palette.PALETTE]
    with pytest.raises(ValueError, match="background"):
        palette.label_color(0)


def test_model_class_colours_come_from_the_palette() -> None:
    from napari_masam.model.config import MASAM_CONFIGS
    from napari_masam.model.lite import litemedsam_metadata, masam_lite_metadata
    from napari_masam.model.masam import default_metadata

    meta = default_metadata(MASAM_CONFIGS["tiny"])
    n = len(meta.class_colors)
    assert meta.class_colors == palette.label_colors(n)
    assert litemedsam_metadata().class_colors == (palette.label_color(1),)
    lite = masam_lite_metadata(num_classes=3, class_names=("a", "b", "c"))
    assert lite.class_colors == palette.label_colors(3)
