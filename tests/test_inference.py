"""The engine against brute-force references written here, on the tiny MA-SAM.

The references follow the MA-SAM authors' procedure literally (pad the whole volume, run every
window, keep the full probability volume, average, argmax); the engine streams, so equality of
labels checks the band bookkeeping at the ends and in the middle.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from napari_masam.inference import (
    Progress,
    SegmentationResult,
    iter_segment_automatic,
    iter_segment_boxes,
    run,
    window_starts,
)
from napari_masam.model import config as masam_config
from napari_masam.model import masam
from napari_masam.model.base import ModelMetadata, SegmentationModel
from napari_masam.preprocess import orientation_transform

S = masam_config.MASAM_CONFIGS["tiny"].image_size  # 64: slices of S x S need no resize
LOW, HIGH = -200.0, 250.0  # ct_abdomen


def tiny_masam(group: int = 5, seed: int = 0) -> SegmentationModel:
    torch.manual_seed(seed)
    config = dataclasses.replace(masam_config.MASAM_CONFIGS["tiny"], slices_per_group=group)
    return masam.build_masam(config, num_classes=3).eval()


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    return tiny_masam()


def ct_volume(depth: int, seed: int = 1, shape: tuple[int, int] = (S, S)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 150, size=(depth, *shape))
    base[:, 10:40, 20:50] += 300  # an "organ" so that classes vary in space
    return base.astype(np.int16)


# -- references --------------------------------------------------------------------------------
def reference_automatic(
    model: SegmentationModel, vol: np.ndarray, *, stride: int = 1, rgb: bool = False
) -> np.ndarray:
    """All windows, full padded probability volume, mean, argmax (slices are S x S)."""
    depth, group = len(vol), model.slices_per_group
    front, back = (group - 1) // 2, group // 2
    padded = np.concatenate([vol[:1]] * front + [vol] + [vol[-1:]] * back)
    if rgb:
        scaled = padded.astype(np.float32) / np.float32(255)
    else:
        scaled = np.clip(padded.astype(np.float32), LOW, HIGH)
    n_windows = len(padded) - group + 1
    starts = list(range(0, n_windows, stride))
    if starts[-1] != n_windows - 1:
        starts.append(n_windows - 1)
    total = np.zeros((len(padded), model.num_classes + 1, S, S), np.float32)
    count = np.zeros(len(padded), np.float32)
    for w in starts:
        g = scaled[w : w + group]
        if rgb:
            x = g.transpose(0, 3, 1, 2)
        else:
            g = (g - g.min()) / (g.max() - g.min())
            x = np.repeat(g[:, None], 3, axis=1)
        with torch.inference_mode():
            p = model(torch.from_numpy(np.ascontiguousarray(x))[None]).softmax(dim=1).numpy()
        total[w : w + group] += p
        count[w : w + group] += 1
    mean = total[front : front + depth] / count[front : front + depth, None, None, None]
    return mean.argmax(axis=1).astype(np.uint8)


def reference_boxes(model, vol, boxes, windows: str = "centred") -> np.ndarray:
    """Brute force: per boxed slice, encode its group, decode its row with each object's box.

    ``"centred"``: the window centred on the slice (replicate-padded at both ends);
    ``"tiled"``: groups 0..D-1, D..2D-1, ... (the last replicate-padded at the end).
    """
    depth, group = len(vol), model.slices_per_group
    out = np.zeros(vol.shape, np.uint8)
    clipped = np.clip(vol.astype(np.float32), LOW, HIGH)
    slices = sorted({z for per in boxes.values() for z in per})
    for z in slices:
        if windows == "centred":
            row = (group - 1) // 2
            start = z - row
        else:
            start, row = z - z % group, z % group
        g = clipped[[min(max(start + d, 0), depth - 1) for d in range(group)]]
        g = (g - g.min()) / (g.max() - g.min())
        x = torch.from_numpy(np.repeat(g[:, None], 3, axis=1))[None]
        ids = [oid for oid in boxes if z in boxes[oid]]
        b = torch.tensor([boxes[oid][z] for oid in ids], dtype=torch.float32)
        with torch.inference_mode():
            emb = model.encode(x)[row : row + 1]
            fg = 1 - model.decode(emb.expand(len(ids), -1, -1, -1), b).softmax(dim=1)[:, 0]
        best, arg = fg.max(dim=0)
        out[z] = np.where(best.numpy() > 0.5, np.array(ids)[arg.numpy()], 0)
    return out


# -- automatic mode ----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 4, 5, 6, 37])
def test_automatic_stride1_equals_bruteforce(model, depth) -> None:
    vol = ct_volume(depth)
    gen = iter_segment_automatic(model, vol, preset="ct_abdomen", batch_size=1)
    seen: list[Progress] = []
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as stop:
            result: SegmentationResult = stop.value
            break
    expected = reference_automatic(model, vol)
    assert result.labels.shape == vol.shape and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, expected)
    assert len(np.unique(expected)) > 1  # the check is not vacuous
    # streaming: one progress per slice, in order, carrying exactly the final labels
    assert [p.slice_index for p in seen] == list(range(depth))
    assert [p.done for p in seen] == list(range(1, depth + 1))
    assert all(p.total == depth for p in seen)
    for p in seen:
        np.testing.assert_array_equal(p.labels_slice, expected[p.slice_index])
    assert result.timings["windows_encoded"] == depth
    assert result.mode == "automatic" and result.class_names == model.metadata.class_names


@pytest.mark.parametrize("stride", [2, 3, 5])
def test_automatic_stride_uses_every_sth_window(model, stride) -> None:
    vol = ct_volume(13, seed=3)
    result = run(iter_segment_automatic(model, vol, preset="ct_abdomen", stride=stride))
    np.testing.assert_array_equal(result.labels, reference_automatic(model, vol, stride=stride))
    assert result.timings["windows_encoded"] == len(window_starts(13, 5, stride))
    assert result.stride == stride


@pytest.mark.parametrize(("group", "depth"), [(1, 4), (2, 5), (4, 6)])
def test_other_group_sizes(group, depth) -> None:
    m = tiny_masam(group=group, seed=group)
    assert m.slices_per_group == group
    vol = ct_volume(depth, seed=group)
    result = run(iter_segment_automatic(m, vol, preset="ct_abdomen"))
    np.testing.assert_array_equal(result.labels, reference_automatic(m, vol))


def test_rgb_video_stack(model) -> None:
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, size=(7, S, S, 3), dtype=np.uint8)
    result = run(iter_segment_automatic(model, frames, preset="rgb", stack_orientation=""))
    assert result.labels.shape == (7, S, S)
    np.testing.assert_array_equal(result.labels, reference_automatic(model, frames, rgb=True))


def test_batches_match_single_windows(model) -> None:
    vol = ct_volume(9, seed=5)
    one = run(iter_segment_automatic(model, vol, preset="ct_abdomen", batch_size=1)).labels
    four = run(iter_segment_automatic(model, vol, preset="ct_abdomen", batch_size=4)).labels
    # batched matmuls may round differently; labels may differ only at float-level ties
    assert (one != four).mean() < 1e-3


def test_errors(model) -> None:
    vol = ct_volume(3)
    with pytest.raises(ValueError, match="stride"):
        next(iter_segment_automatic(model, vol, stride=6))
    with pytest.raises(ValueError, match="shape"):
        next(iter_segment_automatic(model, vol[0]))
    with pytest.raises(TypeError, match="SegmentationModel"):
        next(iter_segment_automatic(nn.Linear(2, 2), vol))
    with pytest.raises(ValueError, match="outside the stack"):
        next(iter_segment_boxes(model, vol, {1: {5: (0, 0, 3, 3)}}))


# -- streaming memory and cancel ---------------------------------------------------------------
def _peak_traced(model, vol) -> int:
    tracemalloc.start()
    try:
        gen = iter_segment_automatic(model, vol, preset="ct_abdomen", stride=5)
        for _ in gen:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_depth(model) -> None:
    small, large = ct_volume(50, seed=6), ct_volume(200, seed=6)
    _peak_traced(model, small)  # warm-up (lazy imports, caches)
    peak_small, peak_large = _peak_traced(model, small), _peak_traced(model, large)
    input_growth = large.nbytes - small.nbytes  # int16 input: 2 bytes per voxel
    # what a non-streaming engine would add: the probability volume, 16 bytes per voxel
    prob_growth = (large.size - small.size) * (model.num_classes + 1) * 4
    growth = peak_large - peak_small
    # the output labels (1 byte per voxel) are allowed to grow; nothing else
    assert growth < input_growth, (growth, input_growth, prob_growth)
    assert prob_growth > 4 * input_growth  # the bound would catch a probability leak


def test_cancel_keeps_finished_slices(model) -> None:
    vol = ct_volume(9, seed=7)
    expected = reference_automatic(model, vol)
    out = np.full(vol.shape, 255, np.uint8)
    gen = iter_segment_automatic(model, vol, preset="ct_abdomen", out=out)
    got = [next(gen) for _ in range(3)]
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    assert [p.slice_index for p in got] == [0, 1, 2]
    for p in got:
        np.testing.assert_array_equal(p.labels_slice, expected[p.slice_index])
    np.testing.assert_array_equal(out[:3], expected[:3])
    assert np.all(out[3:] == 255)  # not touched after cancel
    assert not model.training  # eval state restored (it was eval)


def test_training_flag_restored(model) -> None:
    model.train()
    try:
        run(iter_segment_automatic(model, ct_volume(2), preset="ct_abdomen"))
        assert model.training
    finally:
        model.eval()


# -- orientation -------------------------------------------------------------------------------
@pytest.mark.parametrize("stack_orientation", ["IAR", "SLP"])
def test_orientation_applied_and_undone(model, stack_orientation) -> None:
    oriented = ct_volume(6, seed=8)  # what the model sees, in its own "SPL"
    tr = orientation_transform(stack_orientation, "SPL")
    stack = np.ascontiguousarray(tr.from_model(oriented))
    result = run(
        iter_segment_automatic(
            model, stack, preset="ct_abdomen", stack_orientation=stack_orientation
        )
    )
    np.testing.assert_array_equal(
        result.labels, tr.from_model(reference_automatic(model, oriented))
    )


def test_reslicing_orientation(model) -> None:
    oriented = ct_volume(6, seed=9)
    tr = orientation_transform("LPS", "SPL")  # slices along the stack's last axis
    stack = np.ascontiguousarray(tr.from_model(oriented))
    assert stack.shape == (S, S, 6)
    result = run(iter_segment_automatic(model, stack, preset="ct_abdomen", stack_orientation="LPS"))
    np.testing.assert_array_equal(
        result.labels, tr.from_model(reference_automatic(model, oriented))
    )


@pytest.mark.parametrize("mode", ["boxes", "propagate"])
def test_slice_prompts_refuse_a_stack_resliced_across_its_slice_axis(model, mode) -> None:
    """Box prompts name stack slices: a stack whose slice axis is not the model's is refused
    before any encoding (one check in the engine's start-up, for both prompted modes)."""
    from napari_masam.propagation import iter_propagate

    stack = np.zeros((S, S, 6), dtype=np.float32)
    boxes = {1: {0: (2, 2, 8, 8)}}
    gen_fn = iter_segment_boxes if mode == "boxes" else iter_propagate
    with pytest.raises(ValueError, match="slice axis"):
        run(gen_fn(model, stack, boxes, preset="ct_abdomen", stack_orientation="LPS"))


# -- box mode ----------------------------------------------------------------------------------
def test_boxes_equal_reference_and_leave_other_slices(model) -> None:
    vol = ct_volume(8, seed=10)
    boxes = {
        1: {0: (5, 5, 30, 30), 1: (6, 6, 31, 31), 5: (0, 0, 63, 63)},
        3: {1: (20, 20, 50, 60), 7: (40, 40, 63, 63)},
    }
    out = np.full(vol.shape, 200, np.uint8)
    gen = iter_segment_boxes(model, vol, boxes, preset="ct_abdomen", out=out)
    seen = []
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    expected = reference_boxes(model, vol, boxes)
    assert [p.slice_index for p in seen] == [0, 1, 5, 7]
    for z in (0, 1, 5, 7):
        np.testing.assert_array_equal(out[z], expected[z])
    assert set(np.unique(out[1])) <= {0, 1, 3} and {1, 3} <= set(np.unique(expected[1]))
    for z in (2, 3, 4, 6):
        assert np.all(out[z] == 200)  # slices without a box are untouched
    assert result.labels is out and result.object_ids == (1, 3)
    assert result.class_names == ("object 1", "object 3")


class BoxEcho(SegmentationModel):
    """Logits +10 on the model pixels whose centres lie in the (model-frame) box, -10 elsewhere:
    a mask drawn exactly where the engine put the box."""

    kind = "echo"

    def __init__(self, image_size: int, resize_mode: str, orientation: str = "") -> None:
        super().__init__()
        self.image_size = image_size
        self.slices_per_group = 1
        self.num_classes = 1
        self.supports_automatic = False
        self.supports_boxes = True
        self.metadata = ModelMetadata("echo", orientation=orientation, resize_mode=resize_mode)
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(0, 1)[:, :1] * 0 + self.dummy

    def decode(self, embeddings, boxes_xyxy=None):
        idx = torch.arange(self.image_size, dtype=torch.float32)
        b = boxes_xyxy.float()
        # pixel p (centre p + 0.5 in edge coordinates) is inside [x0, x1 + 1)
        inx = (idx >= b[:, 0:1] - 0.5) & (idx < b[:, 2:3] + 0.5)
        iny = (idx >= b[:, 1:2] - 0.5) & (idx < b[:, 3:4] + 0.5)
        fg = torch.where(iny[:, :, None] & inx[:, None, :], 10.0, -10.0)
        return torch.stack([torch.zeros_like(fg), fg], dim=1)


def box_mask(shape_yx, box) -> np.ndarray:
    m = np.zeros(shape_yx, bool)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
@pytest.mark.parametrize("stack_orientation", ["SPL", "SAR", "SLP"])
def test_box_lands_pixel_exact_on_the_original_grid(mode, stack_orientation) -> None:
    echo = BoxEcho(256, mode, orientation="SPL")
    vol = np.random.default_rng(11).random((3, 181, 217)).astype(np.float32)
    boxes = {
        1: {0: (10, 20, 60, 90), 2: (0, 0, 216, 180)},  # whole slice: touches every edge
        2: {0: (150, 100, 216, 180), 1: (37, 41, 37, 41)},  # a corner box and a one-pixel box
    }
    result = run(
        iter_segment_boxes(echo, vol, boxes, preset="minmax", stack_orientation=stack_orientation)
    )
    assert result.labels.shape == (3, 181, 217)
    for oid, per in boxes.items():
        for z, box in per.items():
            np.testing.assert_array_equal(result.labels[z] == oid, box_mask((181, 217), box))


def test_overlapping_boxes_go_to_the_most_probable_object() -> None:
    class TwoLevels(BoxEcho):
        def decode(self, embeddings, boxes_xyxy=None):
            logits = super().decode(embeddings, boxes_xyxy)
            # object rows get different confidences: 2nd box more confident than the 1st
            scale = torch.linspace(0.2, 1.0, logits.shape[0])[:, None, None]
            logits[:, 1] = logits[:, 1] * scale
            return logits

    echo = TwoLevels(32, "stretch")
    vol = np.zeros((1, 32, 32), np.float32)
    boxes = {4: {0: (0, 0, 20, 20)}, 9: {0: (10, 10, 31, 31)}}
    labels = run(iter_segment_boxes(echo, vol, boxes)).labels[0]
    assert labels[15, 15] == 9 and labels[5, 5] == 4 and labels[25, 25] == 9
    assert labels[5, 25] == 0


def test_reslicing_without_keeping_labels(model) -> None:
    oriented = ct_volume(5, seed=12)
    tr = orientation_transform("LPS", "SPL")
    stack = np.ascontiguousarray(tr.from_model(oriented))
    gen = iter_segment_automatic(
        model, stack, preset="ct_abdomen", stack_orientation="LPS", keep_labels=False
    )
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            labels = stop.value.labels
            break
    assert all(p.slice_index is None for p in steps) and len(steps) == 5
    np.testing.assert_array_equal(labels, tr.from_model(reference_automatic(model, oriented)))


@pytest.mark.parametrize("mode", ["stretch", "longest_side"])
def test_automatic_on_a_resized_grid(mode) -> None:
    """181 x 217 slices: the engine resizes each slice once, then min-maxes the group; the
    textbook order (min-max the group, then resize each window) differs only by rounding."""
    from napari_masam.preprocess import probabilities_to_grid, resize_info, to_model_input

    m = tiny_masam(seed=13)
    m.metadata = dataclasses.replace(m.metadata, resize_mode=mode)
    vol = ct_volume(6, seed=13, shape=(181, 217))
    result = run(iter_segment_automatic(m, vol, preset="ct_abdomen"))
    assert result.labels.shape == (6, 181, 217)
    front, back = 2, 2
    padded = np.clip(
        np.concatenate([vol[:1]] * front + [vol] + [vol[-1:]] * back).astype(np.float32), LOW, HIGH
    )
    total = np.zeros((len(padded), 4, S, S), np.float32)
    for w in range(len(padded) - 4):
        g = padded[w : w + 5]
        x, _ = to_model_input((g - g.min()) / (g.max() - g.min()), S, mode)
        with torch.inference_mode():
            total[w : w + 5] += m(x[None]).softmax(dim=1).numpy()
    info = resize_info((181, 217), S, mode)
    mean = torch.from_numpy(total[front : front + 6])  # the count only scales: same argmax
    expected = probabilities_to_grid(mean, info).argmax(dim=1).numpy()
    assert (result.labels == expected).mean() > 0.99
    assert len(np.unique(expected)) > 1


class _CountingStack:
    """A (Z, Y, X) stack that records which slices were read (a video decodes on access)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.read: set[int] = set()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        z = index[0] if isinstance(index, tuple) else index
        if not isinstance(z, (int, np.integer)):
            raise TypeError("test stack: read one slice at a time")
        self.read.add(int(z))
        return self.data[index]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole stack was read")


def test_box_run_with_minmax_reads_only_the_windows_it_needs(model) -> None:
    vol = ct_volume(30, seed=4)
    stack = _CountingStack(vol)
    boxes = {1: {10: (5, 5, 30, 30)}}
    result = run(iter_segment_boxes(model, stack, boxes, preset="minmax"))
    # the group around slice 10 only: no volume pass over all 30 slices
    assert stack.read == set(range(8, 13))
    # and the same labels as with the whole volume in memory
    expected = run(iter_segment_boxes(model, vol, boxes, preset="minmax")).labels
    np.testing.assert_array_equal(result.labels, expected)


# -- box mode, tiled groups --------------------------------------------------------------------
def _subset_boxes(depth: int) -> dict[int, dict[int, tuple[int, int, int, int]]]:
    """Object 1 on the first, a middle and the last slice; object 2 on every third slice."""
    return {
        1: {z: (5, 5, 45, 40) for z in sorted({0, depth // 2, depth - 1})},
        2: {z: (20, 15, 63, 60) for z in range(0, depth, 3)},
    }


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("depth", [1, 4, 5, 7, 12])
def test_tiled_boxes_equal_bruteforce(model, depth, batch_size) -> None:
    vol = ct_volume(depth, seed=20 + depth)
    boxes = _subset_boxes(depth)
    gen = iter_segment_boxes(
        model, vol, boxes, preset="ct_abdomen", windows="tiled", batch_size=batch_size
    )
    seen = []
    while True:
        try:
            seen.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    expected = reference_boxes(model, vol, boxes, "tiled")
    boxed = sorted({z for per in boxes.values() for z in per})
    assert [p.slice_index for p in seen] == boxed  # stack order, one per boxed slice
    np.testing.assert_array_equal(result.labels, expected)
    assert {1, 2} <= set(np.unique(expected))  # not vacuous
    for p in seen:
        np.testing.assert_array_equal(p.labels_slice, expected[p.slice_index])
    # one encode per group holding a boxed slice
    assert result.timings["windows_encoded"] == len({z // 5 for z in boxed})
    if depth == 12:  # the groups differ from the centred windows, and so do the labels
        centred = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen")).labels
        np.testing.assert_array_equal(centred, reference_boxes(model, vol, boxes))
        assert not np.array_equal(centred, expected)


def _count_encoded_slices(model, monkeypatch) -> list[int]:
    """Wrap ``model.encode``: the list gets the number of slices of every call."""
    calls: list[int] = []
    encode = model.encode

    def counting(images):
        calls.append(images.shape[0] * images.shape[1])
        return encode(images)

    monkeypatch.setattr(model, "encode", counting, raising=False)
    return calls


def test_tiled_encodes_each_group_once(monkeypatch) -> None:
    model = tiny_masam()
    group = model.slices_per_group
    vol = ct_volume(12, seed=5)
    boxed = list(range(1, 11))  # 10 consecutive slices
    boxes = {1: {z: (8, 8, 50, 50) for z in boxed}}
    calls = _count_encoded_slices(model, monkeypatch)
    centred = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen", batch_size=1))
    centred_calls = list(calls)
    calls.clear()
    tiled = run(
        iter_segment_boxes(model, vol, boxes, preset="ct_abdomen", batch_size=1, windows="tiled")
    )
    assert centred_calls == [group] * len(boxed)  # one window of D slices per boxed slice
    n_groups = len({z // group for z in boxed})  # groups 0-4, 5-9, 10-14 (10, 11, 11, 11, 11)
    assert n_groups == 3 and calls == [group] * n_groups
    assert sum(calls) <= len(boxed) + 2 * group and sum(calls) * 3 < sum(centred_calls)
    assert tiled.timings["windows_encoded"] == n_groups
    assert centred.timings["windows_encoded"] == len(boxed)


def test_tiled_groups_share_cache_entries_by_position(model) -> None:
    from napari_masam.cache import EmbeddingCache

    vol = ct_volume(9, seed=6)
    cache = EmbeddingCache()
    first = run(
        iter_segment_boxes(
            model, vol, {1: {1: (5, 5, 40, 40)}}, preset="ct_abdomen", cache=cache, windows="tiled"
        )
    )
    assert first.timings["windows_encoded"] == 1 and len(cache) == 5  # all rows of group 0-4
    again = run(
        iter_segment_boxes(
            model,
            vol,
            {2: {0: (1, 1, 30, 30), 4: (9, 9, 60, 60)}},
            preset="ct_abdomen",
            cache=cache,
            windows="tiled",
        )
    )
    assert again.timings["windows_encoded"] == 0 and again.timings["cache_hits"] == 1
    # the centred window of slice 2 is the tiled group 0-4 (row 2): a hit ...
    hit = run(
        iter_segment_boxes(model, vol, {1: {2: (5, 5, 40, 40)}}, preset="ct_abdomen", cache=cache)
    )
    assert hit.timings["windows_encoded"] == 0
    # ... the centred window of slice 3 (slices 1-5) is another position: encoded
    miss = run(
        iter_segment_boxes(model, vol, {1: {3: (5, 5, 40, 40)}}, preset="ct_abdomen", cache=cache)
    )
    assert miss.timings["windows_encoded"] == 1


def test_single_slice_model_tiled_equals_centred() -> None:
    model = tiny_masam(group=1, seed=3)
    vol = ct_volume(6, seed=7)
    boxes = _subset_boxes(6)
    centred = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen"))
    tiled = run(iter_segment_boxes(model, vol, boxes, preset="ct_abdomen", windows="tiled"))
    np.testing.assert_array_equal(tiled.labels, centred.labels)
    assert {1, 2} <= set(np.unique(tiled.labels))
    boxed = {z for per in boxes.values() for z in per}
    assert tiled.timings["windows_encoded"] == centred.timings["windows_encoded"] == len(boxed)


def test_unknown_box_windows_rejected(model) -> None:
    with pytest.raises(ValueError, match="windows must be one of"):
        run(iter_segment_boxes(model, ct_volume(3), {1: {0: (1, 1, 9, 9)}}, windows="sliding"))


# -- stack values: non-finite policy, complex, one window per input (issue 13.3) ---------------
def _mri_like(depth: int = 6, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = np.zeros((depth, S, S), np.float32)
    vol[:, 12:50, 10:54] = rng.uniform(50, 400, size=(depth, 38, 44))  # a "head" on 0 background
    return vol


def test_nan_outside_the_object_equals_zeros_in_box_mode(model) -> None:
    vol = _mri_like()
    with_nan = vol.copy()
    with_nan[:, :8, :] = np.nan  # the corner outside the head (zeros remain elsewhere)
    with_nan[:, -3:, :5] = -np.inf
    boxes = {1: {z: (12, 14, 50, 46) for z in range(len(vol))}}
    ref = run(iter_segment_boxes(model, vol, boxes, preset="mri"))
    got = run(iter_segment_boxes(model, with_nan, boxes, preset="mri"))
    assert ref.labels.any()
    np.testing.assert_array_equal(got.labels, ref.labels)  # Dice(NaN) == Dice(zeros)
    assert got.preprocessing["non_finite"] == {
        "policy": "replace_with_slice_finite_min",
        "voxels": len(vol) * (8 * S + 15),
    }
    assert ref.preprocessing["non_finite"]["voxels"] == 0


def test_one_nan_voxel_in_automatic_mode_is_the_slice_minimum(model, caplog) -> None:
    vol = _mri_like(7)
    one = vol.copy()
    one[3, 30, 30] = np.nan
    policy = vol.copy()
    policy[3, 30, 30] = vol[3][np.isfinite(one[3])].min()  # what the policy says it becomes
    with caplog.at_level("WARNING"):
        got = run(iter_segment_automatic(model, one, preset="mri"))
    ref = run(iter_segment_automatic(model, policy, preset="mri"))
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert got.preprocessing["non_finite"]["voxels"] == 1
    assert "non-finite" in caplog.text and "Slice 3" in caplog.text


def test_complex_stack_refused_with_advice(model) -> None:
    vol = _mri_like(2).astype(np.complex64)
    with pytest.raises(TypeError, match=r"np\.abs"):
        next(iter_segment_automatic(model, vol))


def test_precomputed_window_makes_chunks_independent() -> None:
    from napari_masam.preprocess import INTENSITY_PRESETS, volume_window

    single = tiny_masam(group=1)
    vol = _mri_like(6)
    vol[4:] *= 3  # the later chunk is brighter: a per-chunk window would differ
    window = volume_window(vol, INTENSITY_PRESETS["mri"])
    whole = run(iter_segment_automatic(single, vol, preset="mri")).labels
    chunks = [
        run(iter_segment_automatic(single, vol[a:b], preset="mri", window=window)).labels
        for a, b in ((0, 3), (3, 6))
    ]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    own = run(iter_segment_automatic(single, vol[:3], preset="mri")).labels
    assert (own != whole[:3]).any()  # without it, the chunk's labels change
    with pytest.raises(ValueError, match="window"):
        next(iter_segment_automatic(single, vol, preset="mri", window=(1.0, float("nan"))))


def test_run_calls_on_yield_and_returns_the_value() -> None:
    def gen():
        yield 1
        yield 2
        return "done"

    seen: list[int] = []
    assert run(gen(), on_yield=seen.append) == "done" and seen == [1, 2]


def test_preferred_batch_size_on_cpu(model, monkeypatch) -> None:
    from napari_masam.inference import default_batch_size

    assert default_batch_size(model, torch.device("cpu")) == 1
    monkeypatch.setattr(model, "preferred_batch_size", 4, raising=False)
    assert default_batch_size(model, torch.device("cpu")) == 4
