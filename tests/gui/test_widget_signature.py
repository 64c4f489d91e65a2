"""What a rerun recomputes: keyframe slices whose prompts differ in any way (issue 16's
correction loop, issue 17's clicks)."""

from __future__ import annotations

import numpy as np

from napari_masam._widget_objects import changed_keyframes, prompts_signature

BOX = (10, 12, 30, 40)


def test_a_slice_whose_clicks_or_mask_went_away_is_recomputed() -> None:
    with_clicks = prompts_signature({5: BOX, 9: BOX}, points_by_slice={5: [(20, 20, 1)]})
    box_only = prompts_signature({5: BOX, 9: BOX})
    assert changed_keyframes(with_clicks, box_only) == ((5,), False)
    assert changed_keyframes(box_only, with_clicks) == ((5,), False)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    with_mask = prompts_signature({5: BOX}, masks_by_slice={5: mask})
    assert changed_keyframes(with_mask, prompts_signature({5: BOX})) == ((5,), False)
    # clicks moved from slice 5 to slice 9 (both keep their boxes): both slices changed
    moved = prompts_signature({5: BOX, 9: BOX}, points_by_slice={9: [(20, 20, 1)]})
    assert changed_keyframes(with_clicks, moved) == ((5, 9), False)
    # unchanged prompts: nothing; a removed keyframe or a new range: the whole object
    assert changed_keyframes(box_only, prompts_signature({9: BOX, 5: BOX})) == ((), False)
    assert changed_keyframes(box_only, prompts_signature({9: BOX})) == ((), True)
    ranged = prompts_signature({5: BOX, 9: BOX}, slice_range=(0, 20))
    assert changed_keyframes(box_only, ranged) == ((), True)
    assert changed_keyframes(None, box_only) == ((5, 9), True)
