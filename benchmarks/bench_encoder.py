"""What MA-SAM's encoder costs over plain SAM, and what the fused attention path saves.

Run: ``python benchmarks/bench_encoder.py`` (vit_b at 512 px, one 5-slice group; a few minutes
on a small CPU) or ``python benchmarks/bench_encoder.py --quick`` (vit_b at 256 px).

Prints, measured in one run on the same input:

- MA-SAM encoder (3D adapters + FacT, fused attention) / segment-anything's ``ImageEncoderViT``
  of the same size (goal <= 1.5 at vit_b/512 on CPU);
- the same with segment-anything's reference attention inside MA-SAM (the adapters' cost alone);
- fused (``scaled_dot_product_attention`` + rel-pos bias) / reference attention of one global
  and one windowed block, with the largest absolute difference of their outputs (goal <= 1e-5).

Timings are the minimum over interleaved repeats (robust against other load on the machine).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from napari_masam.checkpoints import copy_matching, sam_key_to_masam
from napari_masam.model.config import MASAM_CONFIGS
from napari_masam.model.encoder import MASAMImageEncoder


def _min_time(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved, so that load changes hit all alike
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 px instead of 512 px")
    parser.add_argument("--backbone", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 2, quick 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 2)
    config = MASAM_CONFIGS[args.backbone].replace(image_size=256 if args.quick else 512)
    depth = config.slices_per_group
    torch.manual_seed(0)

    plain = ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    ).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(std=0.02)
    ours = MASAMImageEncoder(config).eval()
    copy_matching(ours, {sam_key_to_masam(k): v for k, v in plain.state_dict().items()})
    with torch.no_grad():
        ours.fact.v.weight.normal_(std=0.02)  # non-zero FacT update, as after training

    x = torch.rand(depth, 3, config.image_size, config.image_size)
    print(
        f"{args.backbone} at {config.image_size} px, one group of {depth} slices, "
        f"{torch.get_num_threads()} threads, min of {repeats} interleaved runs"
    )

    def run_ours(impl: str) -> torch.Tensor:
        ours.set_attention_impl(impl)
        return ours(x, depth)

    with torch.no_grad():
        plain(x[:1])  # warm-up (allocator, kernels)
        run_ours("sdpa")
        times = _min_time(
            {
                "sam": lambda: plain(x),
                "masam_sdpa": lambda: run_ours("sdpa"),
                "masam_reference": lambda: run_ours("reference"),
            },
            repeats,
        )
        diff = (run_ours("sdpa") - run_ours("reference")).abs().max().item()
    print(f"  plain SAM ImageEncoderViT            {times['sam']:8.2f} s")
    print(f"  MA-SAM encoder, fused attention      {times['masam_sdpa']:8.2f} s")
    print(f"  MA-SAM encoder, reference attention  {times['masam_reference']:8.2f} s")
    print(
        f"  ratio MA-SAM (fused) / SAM           {times['masam_sdpa'] / times['sam']:8.2f}   (goal <= 1.5)"
    )
    print(
        f"  ratio MA-SAM (reference) / SAM       {times['masam_reference'] / times['sam']:8.2f}   (adapters + FacT alone)"
    )
    print(f"  max |fused - reference| encoder out  {diff:8.1e}")

    grid = config.grid_size
    for label, block in (
        ("global", ours.blocks[config.global_attn_indexes[0]]),
        ("window", ours.blocks[0]),
    ):
        attn = block.attn
        with torch.no_grad():
            attn.rel_pos_h.normal_(std=0.1)
            attn.rel_pos_w.normal_(std=0.1)
            if block.window_size:
                windows = depth * math.ceil(grid / config.window_size) ** 2
                t = torch.randn(windows, config.window_size, config.window_size, config.embed_dim)
            else:
                t = torch.randn(depth, grid, grid, config.embed_dim)

            def call(impl: str, attn: nn.Module = attn, t: torch.Tensor = t) -> torch.Tensor:
                attn.impl = impl
                return attn(t)

            at = _min_time(
                {"ref": partial(call, "reference"), "sdpa": partial(call, "sdpa")}, repeats + 1
            )
            err = (call("sdpa") - call("reference")).abs().max().item()
        print(
            f"  attention {label:6s} fused / reference  {at['sdpa'] / at['ref']:8.2f}   "
            f"({at['sdpa'] * 1e3:.0f} vs {at['ref'] * 1e3:.0f} ms, max abs diff {err:.1e}, goal <= 1e-5)"
        )


if __name__ == "__main__":
    main()
