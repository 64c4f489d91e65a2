"""Menus show only user models; test configs stay buildable; one trainable-names definition."""

from __future__ import annotations

import pytest
import torch
from configs import TINY, TINY_LITE_ENCODER, TINY_TRAIN

from napari_masam.model import config, masam
from napari_masam.model.registry import MODEL_REGISTRY


def test_test_configs_hidden_from_user_menus():
    assert set(config.TEST_CONFIG_NAMES) == {"tiny", "tiny_train"}
    assert set(config.USER_CONFIGS) == {"vit_b", "vit_l", "vit_h"}
    assert not set(config.USER_CONFIGS) & set(config.TEST_CONFIG_NAMES)
    assert all(config.is_test_config(n) for n in ("tiny", "tiny_train"))
    assert not config.is_test_config("vit_b")
    assert TINY is config.MASAM_CONFIGS["tiny"] and TINY_TRAIN.patch_size == 4
    assert not any(config.is_test_config(name) for name in MODEL_REGISTRY)


def test_registry_declares_automatic_support():
    assert MODEL_REGISTRY["litemedsam"].automatic == "none"
    assert MODEL_REGISTRY["masam-lite"].automatic == "untrained"
    assert {MODEL_REGISTRY[f"masam_vit_{k}"].automatic for k in "blh"} == {"checkpoint"}


def test_one_trainable_names_function_for_both_kinds():
    from napari_masam.model.lite import LiteMedSAM
    from napari_masam.model.masam_lite import MASAMLite

    vit = masam.build_masam("tiny", num_classes=2)
    vit_names = masam.trainable_parameter_names(vit)
    assert any(".adapter_1." in n for n in vit_names)
    assert any(n.startswith("mask_decoder.") for n in vit_names)
    assert not any(".attn.qkv.weight" in n or "patch_embed" in n for n in vit_names)
    lite = MASAMLite(num_classes=2, encoder_config=TINY_LITE_ENCODER)
    names = masam.trainable_parameter_names(lite)
    assert names == lite.trainable_parameter_names()
    kinds = {n.split(".")[0] for n in names}
    assert kinds == {
        "image_encoder",
        "prompt_encoder",
        "mask_decoder",
        "class_tokens",
        "class_hypernetworks_mlps",
    }
    frozen = {n for n, _ in lite.named_parameters()} - set(names)
    assert frozen and all(n.startswith("image_encoder.") for n in frozen)
    assert not any(".adapter_" in n or ".fact." in n or "FacTs" in n for n in frozen)
    no_prompt = masam.trainable_parameter_names(lite, train_prompt_encoder=False)
    assert set(names) - set(no_prompt) == {n for n in names if n.startswith("prompt_encoder.")}
    with pytest.raises(ValueError, match="no 3D adapters"):
        masam.trainable_parameter_names(LiteMedSAM(encoder_config=TINY_LITE_ENCODER))
    # set_trainable follows the same list
    masam.set_trainable(lite)
    assert {n for n, p in lite.named_parameters() if p.requires_grad} == set(names)
    assert torch.is_grad_enabled()
