"""Checkpoints: SAM base + authors' MA-SAM files, our safetensors format, key names, errors.

Generated files only: a fake Meta SAM checkpoint at the tiny size whose token grid is twice the
tiny model's (so pos_embed and the global rel_pos are resized, as 64 -> 32 for the real thing),
built from segment-anything's own classes so that it has Meta's key layout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from napari_masam import checkpoints as ckpt
from napari_masam.checkpoints import CheckpointError
from napari_masam.model.base import ModelMetadata
from napari_masam.model.config import MASAM_CONFIGS
from napari_masam.model.masam import MASAM, build_masam

#: Copies of the authors' key lists from shared/spec (facts about their files), so CI needs no
#: checkout beside the repository.
SPEC = Path(__file__).resolve().parent / "data" / "spec"
TINY = MASAM_CONFIGS["tiny"]
SAM_IMAGE = 2 * TINY.image_size  # fake SAM pretraining size: token grid 2x the model's


def make_fake_sam(embed_dim: int = TINY.embed_dim, depth: int = TINY.depth, seed: int = 0) -> Sam:
    """segment-anything's Sam at tiny numbers, random weights everywhere (Meta's key layout)."""
    torch.manual_seed(seed)
    grid, dim = SAM_IMAGE // 16, TINY.prompt_embed_dim
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=SAM_IMAGE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=TINY.num_heads,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            out_chans=dim,
            use_rel_pos=True,
            window_size=TINY.window_size,
            global_attn_indexes=tuple(i for i in TINY.global_attn_indexes if i < depth),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(SAM_IMAGE, SAM_IMAGE),
            mask_in_chans=TINY.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=dim, mlp_dim=TINY.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=TINY.iou_head_hidden_dim,
        ),
    )
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(std=0.2)
    return sam


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(make_fake_sam().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(sam_file) -> MASAM:
    """A 'fine-tuned' tiny MA-SAM: SAM base + random adapters/FacT/decoder."""
    model = ckpt.load_masam(
        sam_file,
        image_size=TINY.image_size,
        num_classes=TINY.num_classes,
        fact_rank=TINY.fact_rank,
        adapter_width=TINY.adapter_width,
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def authors_file(trained, tmp_path_factory) -> Path:
    return ckpt.save_authors_checkpoint(
        trained, tmp_path_factory.mktemp("masam") / "masam_tiny.pth"
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(1, 5, 3, TINY.image_size, TINY.image_size, generator=gen)


def _out(model: MASAM, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(images, boxes)


def _load(sam_file, masam_file=None, **kw) -> MASAM:
    return ckpt.load_masam(sam_file, masam_file, image_size=TINY.image_size, **kw)


# -- independent bilinear resize (half-pixel centres, edge clamp), numpy ------------------------
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=False."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def test_bilinear_matrix_sanity():
    # upsampling 2 -> 4 with half-pixel centres: 0.25/0.75 blends and clamped ends
    np.testing.assert_allclose(bilinear_matrix(2, 4) @ [0.0, 1.0], [0.0, 0.25, 0.75, 1.0])


@pytest.mark.parametrize(("g_in", "g_out"), [(8, 4), (64, 32), (4, 10)])
def test_resize_pos_embed_against_numpy(g_in, g_out):
    pe = torch.randn(1, g_in, g_in, 3, dtype=torch.float64)
    r = bilinear_matrix(g_in, g_out)
    want = np.einsum("yi,xj,ijc->yxc", r, r, pe[0].numpy())[None]
    got = ckpt.resize_pos_embed(pe, g_out)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)


@pytest.mark.parametrize(("n_in", "n_out"), [(127, 63), (15, 7), (7, 15)])
def test_resize_rel_pos_against_numpy(n_in, n_out):
    rp = torch.randn(n_in, 5, dtype=torch.float64)
    want = bilinear_matrix(n_in, n_out) @ rp.numpy()  # the head_dim axis is kept as is
    np.testing.assert_allclose(ckpt.resize_rel_pos(rp, n_out).numpy(), want, atol=1e-10)


# -- SAM base loading ------------------------------------------------------------------------
def test_architecture_inferred_from_files(sam_file, authors_file):
    model = _load(sam_file, authors_file)
    cfg = model.config
    for field in (
        "embed_dim", "depth", "num_heads", "global_attn_indexes", "window_size", "patch_size",
        "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim",
        "iou_head_hidden_dim", "num_classes", "fact_rank", "adapter_width", "image_size",
    ):  # fmt: skip
        assert getattr(cfg, field) == getattr(TINY, field), field
    assert cfg.slices_per_group == 5


def test_sam_tensors_copied_and_resized(sam_file):
    sam = torch.load(sam_file, map_location="cpu", weights_only=True)
    model = _load(sam_file, num_classes=3)
    own = model.state_dict()
    g = TINY.grid_size
    r = bilinear_matrix(2 * g, g)
    pe = np.einsum("yi,xj,ijc->yxc", r, r, sam["image_encoder.pos_embed"][0].double().numpy())
    np.testing.assert_allclose(own["image_encoder.pos_embed"][0].numpy(), pe, atol=1e-5)
    for i in range(TINY.depth):
        for axis in "hw":
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if i in TINY.global_attn_indexes:
                want = bilinear_matrix(4 * g - 1, 2 * g - 1) @ sam[key].double().numpy()
                assert own[key].shape == (2 * g - 1, TINY.head_dim)
                np.testing.assert_allclose(own[key].numpy(), want, atol=1e-5)
            else:  # window blocks keep theirs
                assert torch.equal(own[key], sam[key])
        assert torch.equal(
            own[f"image_encoder.blocks.{i}.attn.qkv.qkv.weight"],
            sam[f"image_encoder.blocks.{i}.attn.qkv.weight"],
        )
    for key in ("image_encoder.neck.2.weight", "prompt_encoder.point_embeddings.2.weight",
                "mask_decoder.transformer.layers.1.mlp.lin1.weight",
                "mask_decoder.output_upscaling.3.weight",  # same shape in SAM: copied (spec quirk)
                "mask_decoder.mask_tokens.weight"):  # fmt: skip
        assert torch.equal(own[key], sam[key]), key
    # other shapes than SAM's: fresh init
    last = "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight"
    assert own[last].shape != sam[last].shape


def test_authors_round_trip_identical_outputs(trained, sam_file, authors_file, images, tmp_path):
    loaded = _load(sam_file, authors_file)
    boxes = torch.tensor([4.0, 5.0, 50.0, 40.0]).expand(1, 5, 4)
    torch.testing.assert_close(_out(loaded, images), _out(trained, images), rtol=0, atol=0)
    torch.testing.assert_close(
        _out(loaded, images, boxes), _out(trained, images, boxes), rtol=0, atol=0
    )
    again = ckpt.save_authors_checkpoint(loaded, tmp_path / "again.pth")
    a = torch.load(authors_file, map_location="cpu", weights_only=True)
    b = torch.load(again, map_location="cpu", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_our_format_round_trip(trained, sam_file, images, tmp_path):
    meta = ModelMetadata(
        name="btcv-tiny",
        class_names=("liver", "spleen", "aorta"),
        class_colors=("#ff0000", "#00ff00", "#0000ff"),
        intensity_preset="ct_abdomen",
        provenance=dict(trained.metadata.provenance),
    )
    path = ckpt.save_checkpoint(
        trained, tmp_path / "m.safetensors", metadata=meta, provenance={"run": "t1"}
    )
    model = ckpt.load_checkpoint(path)
    assert type(model) is MASAM and model.config == trained.config
    torch.testing.assert_close(_out(model, images), _out(trained, images), rtol=0, atol=0)
    assert model.metadata.class_names == meta.class_names
    assert model.metadata.intensity_preset == "ct_abdomen"
    assert model.metadata.provenance["run"] == "t1"
    assert model.metadata.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    header = ckpt.read_checkpoint_header(path)
    sam_digest = hashlib.sha256(Path(sam_file).read_bytes()).hexdigest()
    assert header["base_sha256"] == sam_digest == model.metadata.provenance["sam_sha256"]
    assert header["kind"] == "masam" and header["config"] == trained.get_config()
    # full state in the file: trainable and frozen parts
    assert {k for k in model.state_dict()} == set(trained.state_dict())


def test_load_model_dispatch(trained, sam_file, authors_file, images, tmp_path):
    ours = ckpt.save_checkpoint(trained, tmp_path / "m.safetensors")
    from_ours = ckpt.load_model(ours, device="cpu")
    from_pair = ckpt.load_model(
        sam_file, masam_checkpoint=authors_file, device="cpu", image_size=64
    )
    for model in (from_ours, from_pair):
        torch.testing.assert_close(_out(model, images), _out(trained, images), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="neither a model name"):
        ckpt.load_model(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth"):
        ckpt.load_model("masam_vit_b", device="cpu")


def _retag_cuda(src: Path, dst: Path) -> Path:
    """Rewrite a torch zip file so that every storage is tagged 'cuda:0' (as if saved on a GPU)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info.filename, data)
    return dst


def test_cuda_tagged_checkpoint_loads_on_cpu(trained, sam_file, authors_file, images, tmp_path):
    cuda_file = _retag_cuda(authors_file, tmp_path / "masam_cuda.pth")
    if not torch.cuda.is_available():  # proves the file really is CUDA-tagged
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(cuda_file, weights_only=True)
    model = _load(sam_file, cuda_file)
    torch.testing.assert_close(_out(model, images), _out(trained, images), rtol=0, atol=0)


def test_every_torch_load_is_cpu_and_weights_only(sam_file, authors_file, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _load(sam_file, authors_file)
    assert len(calls) == 2
    assert all(c.get("map_location") == "cpu" and c.get("weights_only") is True for c in calls)


# -- errors ----------------------------------------------------------------------------------
def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_missing_files(sam_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="SAM checkpoint"):
        _load(tmp_path / "none.pth", num_classes=3)
    with pytest.raises(FileNotFoundError, match="MA-SAM checkpoint"):
        _load(sam_file, tmp_path / "none.pth")
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "none.safetensors")


def test_truncated_and_foreign_files(sam_file, authors_file, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(authors_file.read_bytes()[: authors_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.pth.*truncated, corrupted"):
        _load(sam_file, truncated)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        _load(text, num_classes=3)
    listing = _save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        _load(sam_file, listing)


def test_swapped_files(sam_file, authors_file):
    with pytest.raises(CheckpointError, match="looks like an MA-SAM checkpoint"):
        _load(authors_file, sam_file)
    with pytest.raises(CheckpointError, match="looks like a SAM checkpoint"):
        _load(sam_file, sam_file)


def test_wrong_backbone_names_shapes(sam_file, authors_file, tmp_path):
    wide = tmp_path / "sam_wide.pth"
    torch.save(make_fake_sam(embed_dim=48).state_dict(), wide)
    other = ckpt.load_masam(wide, image_size=64, num_classes=3, fact_rank=4, adapter_width=16)
    other_file = ckpt.save_authors_checkpoint(other, tmp_path / "masam_wide.pth")
    with pytest.raises(
        CheckpointError, match=r"Wrong backbone.*embed dim 48.*\(4, 48\).*sam_tiny.pth"
    ):
        _load(sam_file, other_file)
    shallow = tmp_path / "sam_shallow.pth"
    torch.save(make_fake_sam(depth=2).state_dict(), shallow)
    with pytest.raises(
        CheckpointError, match=r"Wrong backbone.*3 blocks.*sam_shallow.pth.*2 blocks"
    ):
        _load(shallow, authors_file)


def test_wrong_class_count(sam_file, authors_file):
    with pytest.raises(
        CheckpointError, match=r"Wrong class count.*3 classes.*\(4, 64\).*num_classes=5"
    ):
        _load(sam_file, authors_file, num_classes=5)


def test_num_classes_needed_without_masam_file(sam_file):
    with pytest.raises(ValueError, match="num_classes is needed"):
        _load(sam_file)


def test_overrides_must_not_contradict_files(sam_file, authors_file):
    with pytest.raises(CheckpointError, match=r"fact_rank=4 \(asked 8\)"):
        _load(sam_file, authors_file, fact_rank=8)
    model = _load(sam_file, authors_file, fact_rank=4, fact_scale=1.0)
    assert model.config.fact_rank == 4


def test_missing_and_unexpected_keys_are_grouped(sam_file, authors_file, tmp_path):
    state = torch.load(authors_file, map_location="cpu", weights_only=True)
    cut = {k: v for k, v in state.items() if "adapter_conv_2" not in k}
    cut["foo.bar"] = torch.zeros(1)
    path = _save(cut, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as info:
        _load(sam_file, path)
    msg = str(info.value)
    assert "cut.pth" in msg
    assert "missing 6 keys" in msg
    assert "image_encoder.ImageEncoderViT.blocks.*.Block.adapter_conv_2.weight (x3)" in msg
    assert "unexpected 1 keys: foo.bar" in msg


def test_inconsistent_decoder_is_a_class_count_error(sam_file, authors_file, tmp_path):
    state = torch.load(authors_file, map_location="cpu", weights_only=True)
    state["mask_decoder.iou_prediction_head.layers.2.weight"] = torch.zeros(9, 32)
    path = _save(state, tmp_path / "odd.pth")
    with pytest.raises(
        CheckpointError, match=r"wrong class count.*iou_prediction_head.layers.2.weight \(9, 32\)"
    ):
        _load(sam_file, path)


def test_preset_rejects_other_backbone(sam_file, authors_file):
    from napari_masam.model.registry import build_model

    with pytest.raises(CheckpointError, match=r"Wrong backbone.*sam_tiny.pth.*vit_b was asked"):
        build_model(
            "masam_vit_b", sam_checkpoint=sam_file, masam_checkpoint=authors_file, device="cpu"
        )


def test_our_format_errors(trained, tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a napari-masam checkpoint"):
        ckpt.load_checkpoint(foreign)
    good = ckpt.save_checkpoint(trained, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        ckpt.load_checkpoint(cut)
    # tensors of a 3-class model under a header that claims 4 classes
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(header["config"])
    config["num_classes"] = 4
    header["config"] = json.dumps(config)
    lying = tmp_path / "lying.safetensors"
    save_file(tensors, str(lying), metadata=header)
    with pytest.raises(
        CheckpointError, match=r"(?s)lying.safetensors.*mask_tokens.weight \(4, 64\) vs \(5, 64\)"
    ):
        ckpt.load_checkpoint(lying)
    with pytest.raises(ValueError, match="Unknown model kind"):
        ckpt.model_from_config("unet", {}, None)


# -- key names against the authors' lists (vit_b, built once) ------------------------------------
def _read_tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    with open(SPEC / name, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [
        (r["key"], tuple(int(x) for x in r["shape"].strip("()").split(",") if x.strip()))
        for r in rows
    ]


@pytest.fixture(scope="module")
def vit_b() -> MASAM:
    return build_masam("vit_b")


def test_saved_authors_checkpoint_matches_spec_list(vit_b, tmp_path):
    path = ckpt.save_authors_checkpoint(vit_b, tmp_path / "masam_vit_b.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == _read_tsv(
        "masam_checkpoint_keys_vit_b.tsv"
    )
    assert all(v.dtype == torch.float32 for v in state.values())


def test_live_model_keys_match_spec_list(vit_b):
    got = [(k, tuple(v.shape)) for k, v in ckpt.authors_state_dict(vit_b).items()]
    assert got == _read_tsv("masam_state_dict_vit_b.tsv")


def test_key_renaming_inverts(vit_b):
    for key in vit_b.state_dict():
        assert ckpt.from_authors_key(ckpt.to_authors_key(key)) == key
        assert ckpt.from_authors_key(ckpt.to_authors_key(key, saved=True)) == key


@pytest.mark.slow
def test_registry_builds_full_vit_b_from_a_sam_and_an_authors_file(vit_b, tmp_path):
    """The user's path: two files, one registry name, nothing else."""
    import segment_anything

    from napari_masam.model.registry import build_model

    torch.manual_seed(7)
    sam = segment_anything.sam_model_registry["vit_b"]()  # Meta's layout at 1024 px (64 x 64)
    sam_state = sam.state_dict()
    del sam
    sam_path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_state, sam_path)
    with torch.no_grad():  # trained-looking parts: non-zero FacT V so the file matters
        vit_b.image_encoder.fact.v.weight.normal_(std=0.02)
    masam_path = ckpt.save_authors_checkpoint(vit_b, tmp_path / "masam_vit_b.pth")

    model = build_model(
        "masam_vit_b", sam_checkpoint=sam_path, masam_checkpoint=masam_path, device="cpu"
    )
    assert isinstance(model, MASAM) and model.num_classes == 12
    assert sum(p.numel() for p in model.parameters()) == 117_421_209
    state = model.state_dict()
    # frozen parts come from SAM (fused qkv renamed into FacT's wrapper) ...
    for key in ("image_encoder.blocks.3.mlp.lin1.weight", "image_encoder.blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(
            state[ckpt.sam_key_to_masam(key)], sam_state[key], rtol=0, atol=0
        )
    # ... resized to the 32 x 32 grid of 512 px inputs: pos_embed and global rel_pos only
    assert state["image_encoder.pos_embed"].shape == (1, 32, 32, 768)
    assert state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (63, 64)
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    # ... and the trained parts come from the authors' file
    authors = torch.load(masam_path, map_location="cpu", weights_only=True)
    for key, value in authors.items():
        torch.testing.assert_close(state[ckpt.from_authors_key(key)], value, rtol=0, atol=0)


# -- hostile files (issue 13.2, 13.5) ----------------------------------------------------------
class _CallsPrint:
    """Pickles as a call of builtins.print: a checkpoint that carries code."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_checkpoint_carrying_code_is_refused_in_plain_words(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _CallsPrint()}, path)
    with pytest.raises(CheckpointError) as info:
        ckpt.read_state_dict(path, what="MA-SAM checkpoint")
    message = str(info.value)
    assert "contains executable code" in message and "will not be loaded" in message
    assert "builtins.print" in message
    # never torch's advice to load it unsafely, and not called damaged
    assert "weights_only" not in message and "truncated" not in message
    assert "this ran" not in capsys.readouterr().out


def _rewrite_header(src: Path, dst: Path, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(header["config"])
    change(config)
    header["config"] = json.dumps(config)
    save_file(tensors, str(dst), metadata=header)
    return dst


def _no_build(monkeypatch):
    """Fail the test if load_checkpoint builds a real model."""
    from napari_masam.checkpoints import ours

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the header was checked")

    monkeypatch.setattr(ours, "model_from_config", refuse)


def test_giant_header_config_refused_before_any_model_is_built(trained, tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(trained, tmp_path / "good.safetensors")

    def giant(config):  # ViT with embed dim 4096 x 48 blocks: tens of GB if built
        config.update(embed_dim=4096, depth=48, num_heads=16, global_attn_indexes=[11, 23, 35, 47])

    lying = _rewrite_header(good, tmp_path / "giant.safetensors", giant)
    _no_build(monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=r"giant\.safetensors.*depth 48 but the file holds tensors of 3 encoder",
    ):
        ckpt.load_checkpoint(lying)


def test_header_config_compared_with_tensor_shapes_before_build(trained, tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(trained, tmp_path / "good.safetensors")
    wide = _rewrite_header(good, tmp_path / "wide.safetensors", lambda c: c.update(mlp_ratio=64.0))
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"(?s)other shapes.*mlp\.lin1\.weight.*edited"):
        ckpt.load_checkpoint(wide)
    huge = _rewrite_header(good, tmp_path / "huge.safetensors", lambda c: c.update(depth=10**9))
    with pytest.raises(CheckpointError, match="impossible sizes"):
        ckpt.load_checkpoint(huge)
    many = _rewrite_header(
        good, tmp_path / "classes.safetensors", lambda c: c.update(num_classes=60_000)
    )
    with pytest.raises(CheckpointError, match=r"mask_tokens\.weight \(4, 64\) vs \(60001, 64\)"):
        ckpt.load_checkpoint(many)


def test_lite_header_bounded_by_tensors_held(tmp_path, monkeypatch):
    from napari_masam.model import lite

    model = lite.build_lite_from_config("litemedsam", {"kind": "litemedsam"})
    good = ckpt.save_checkpoint(model, tmp_path / "lite.safetensors")

    def giant(config):
        config["encoder"]["embed_dims"] = [4096, 4096, 4096, 4096]
        config["encoder"]["depths"] = [12, 12, 12, 12]

    lying = _rewrite_header(good, tmp_path / "lite_giant.safetensors", giant)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"lite_giant\.safetensors.*parameters.*numbers"):
        ckpt.load_checkpoint(lying)
    classes = _rewrite_header(
        good, tmp_path / "lite_classes.safetensors", lambda c: c.update(num_classes=60_000)
    )
    with pytest.raises(CheckpointError, match="parameters"):
        ckpt.load_checkpoint(classes)


def test_partial_sam_base_refused_instead_of_random_frozen_parts(sam_file, tmp_path):
    state = torch.load(sam_file, map_location="cpu", weights_only=True)
    # block 1 of a hostile/partial base: its MLP would silently keep a random init
    for key in [k for k in state if k.startswith("image_encoder.blocks.1.mlp.")]:
        del state[key]
    partial = _save(state, tmp_path / "sam_partial.pth")
    with pytest.raises(CheckpointError, match=r"sam_partial\.pth lacks 4 frozen tensors.*mlp"):
        _load(partial, num_classes=3, fact_rank=TINY.fact_rank, adapter_width=TINY.adapter_width)


# -- model sources (issue 12) -------------------------------------------------------------------
def test_model_source_parse_is_the_one_decision(trained, sam_file, authors_file, tmp_path):
    from napari_masam.checkpoints import ModelSource
    from napari_masam.model.registry import DEFAULT_MODEL

    ours = ckpt.save_checkpoint(trained, tmp_path / "m.safetensors")
    renamed = tmp_path / "no_suffix.bin"
    renamed.write_bytes(ours.read_bytes())
    assert ModelSource.parse(None) == ModelSource("preset", name=DEFAULT_MODEL)
    assert ModelSource.parse("masam-lite").kind == "preset"
    assert ModelSource.parse(ours) == ModelSource("checkpoint", checkpoint=ours)
    assert ModelSource.parse(str(renamed)).kind == "checkpoint"  # by header, not suffix
    pair = ModelSource.parse(sam_file, masam_checkpoint=authors_file)
    assert (pair.kind, pair.sam_checkpoint, pair.masam_checkpoint) == (
        "sam_pair",
        sam_file,
        authors_file,
    )
    named = ModelSource.parse("masam_vit_b", sam_checkpoint=sam_file)
    assert (named.kind, named.name) == ("sam_pair", "masam_vit_b")
    with pytest.raises(ValueError, match=r"Unknown model 'vit_q'.*litemedsam"):
        ModelSource.parse("vit_q")
    with pytest.raises(ValueError, match="not both"):
        ModelSource.parse(checkpoint=ours, sam_checkpoint=sam_file)
    with pytest.raises(ValueError, match="needs Meta's SAM base"):
        ModelSource.parse(masam_checkpoint=authors_file)
    with pytest.raises(ValueError, match="brings its own weights"):
        ModelSource.parse("litemedsam", sam_checkpoint=sam_file)
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth"):
        ModelSource.parse("masam_vit_b")
    with pytest.raises(FileNotFoundError, match="folder"):
        ModelSource.parse(checkpoint=tmp_path)


def test_model_source_identity_follows_content_not_names(trained, sam_file, authors_file, tmp_path):
    from napari_masam.checkpoints import ModelSource

    ours = ckpt.save_checkpoint(trained, tmp_path / "m.safetensors")
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(ours.read_bytes())
    a, b = ModelSource.parse(ours).identity(), ModelSource.parse(copy).identity()
    assert a.sha256 == b.sha256 and a.description != b.description
    digest = hashlib.sha256(ours.read_bytes()).hexdigest()
    assert a.files == (("checkpoint", "m.safetensors", digest),)
    assert json.loads(json.dumps(a.to_dict()))["files"][0]["sha256"] == digest
    pair = ModelSource.parse(sam_file, masam_checkpoint=authors_file).identity()
    base_only = ModelSource.parse(sam_file, num_classes=3).identity()
    assert len({a.sha256, pair.sha256, base_only.sha256}) == 3
    assert "MA-SAM masam_tiny.pth" in pair.description
    lite = ModelSource.parse("litemedsam").identity()
    from napari_masam.weights import LITEMEDSAM_SHA256

    assert lite.files[0][2] == LITEMEDSAM_SHA256 and "embedded" in lite.description


def test_model_source_load_matches_direct_loaders(
    trained, sam_file, authors_file, images, tmp_path
):
    from napari_masam.checkpoints import ModelSource

    ours = ckpt.save_checkpoint(trained, tmp_path / "m.safetensors")
    for source in (
        ModelSource.parse(ours),
        ModelSource.parse(sam_file, masam_checkpoint=authors_file, image_size=TINY.image_size),
    ):
        model = source.load("cpu")
        torch.testing.assert_close(_out(model, images), _out(trained, images), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not MA-SAM vit_b"):
        ModelSource.parse("masam_vit_b", checkpoint=ours).load("cpu")


@pytest.mark.parametrize("which", ["ours", "authors"])
def test_interrupted_save_keeps_the_previous_file(trained, tmp_path, monkeypatch, which):
    import safetensors.torch

    path = tmp_path / ("m.safetensors" if which == "ours" else "m.pth")
    save = ckpt.save_checkpoint if which == "ours" else ckpt.save_authors_checkpoint
    save(trained, path)
    before = path.read_bytes()

    def half_then_ctrl_c(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half")
        raise KeyboardInterrupt

    if which == "ours":
        monkeypatch.setattr(safetensors.torch, "save_file", half_then_ctrl_c)
    else:
        monkeypatch.setattr(torch, "save", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save(trained, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_authors_file_class_count_bounded_by_what_it_holds(sam_file, authors_file, tmp_path):
    state = torch.load(authors_file, map_location="cpu", weights_only=True)
    # 60000 mask tokens (61 MB) would size a decoder of ~60000 hypernetwork MLPs
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(60_000, 1)
    edited = _save(state, tmp_path / "masam_edited.pth")
    with pytest.raises(CheckpointError, match=r"masam_edited\.pth.*60000 masks.*holds 4 output"):
        _load(sam_file, edited)
