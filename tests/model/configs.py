"""Test-only model configurations (tiny random-weight networks of the real architectures).

``napari_masam.model.config`` keeps them registered under :data:`TEST_CONFIG_NAMES` so that
``build_masam("tiny")`` keeps working, but hides them from user menus (``USER_CONFIGS``).
"""

from __future__ import annotations

from napari_masam.model.config import MASAM_CONFIGS

#: 4x4 token grid with 3x3 windows, 64 px input: forward well under a second on a CPU.
TINY = MASAM_CONFIGS["tiny"]
#: ``TINY`` with 4 px patches (16 x 16 token grid): the fine-tuning tests' model.
TINY_TRAIN = MASAM_CONFIGS["tiny_train"]

#: LiteMedSAM's TinyViT at 64 px (the last stage must be 320 wide: TinyViT keeps stride 1 there).
TINY_LITE_ENCODER = {
    "img_size": 64,
    "in_chans": 3,
    "embed_dims": [8, 16, 16, 320],
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 2, 4],
    "window_sizes": [7, 7, 7, 7],
    "mlp_ratio": 2.0,
    "mbconv_expand_ratio": 2.0,
    "local_conv_size": 3,
}
