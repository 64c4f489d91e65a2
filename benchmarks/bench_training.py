"""Fine-tuning cost: training steps/s and peak memory, trainable/total parameter ratios.

Run: ``python benchmarks/bench_training.py [--quick] [--device cpu|cuda]``
or ``python benchmarks/bench_training.py --cpu-step [--rounds 3]`` for the numbers behind the
Fine-tune widget's CPU defaults (:data:`napari_masam.training.DEVICE_DEFAULTS`): one MA-SAM-Lite
optimiser step (batch 1, D = 5) at 256/192/128/96 px, measured interleaved in one process, as
seconds per step, the ratio to 256 px, and the projected length of the default CPU run.

Each measurement runs in its own child process so that its peak resident memory (ru_maxrss) is
its own; "overhead" is the peak while training minus the peak of a child that only builds the
model and reads the data (the cost of activations, gradients and AdamW state). Models:

* ``masam-lite``: MA-SAM-Lite on the embedded LiteMedSAM at its native 256 px (laptop CPU case);
* ``masam-lite-64``: the same weights fed 64 px inputs (the unit tests' setting);
* ``tiny``: the tiny MA-SAM config (random weights);
* ``tiny_train``: the same with 4 px patches (16 x 16 token grid; the learning test's model);
* ``vit_b`` (``--device cuda`` only): MA-SAM ViT-B at 512 px with autocast.

One step = one optimiser step on a batch of groups of 5 slices (the recipe's loss, AdamW,
augmentation on). The parameter table counts the spec's vit_b (512 px, 12 classes; the spec says
30.1 M trainable of 117.4 M).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _model(name: str, num_classes: int, device: str):
    import torch

    from napari_masam.training import build_training_model

    if name == "masam-lite-64":
        from napari_masam.model.lite import LITEMEDSAM_ENCODER, build_lite_from_config

        config = {
            "kind": "masam-lite",
            "image_size": 64,
            "encoder": dict(LITEMEDSAM_ENCODER, img_size=64),
            "num_classes": num_classes,
        }
        return build_lite_from_config("masam-lite", config, load_base_weights=True).to(device)
    if name == "vit_b":
        from napari_masam.model.masam import build_masam

        torch.manual_seed(0)
        return build_masam("vit_b", num_classes=num_classes, device=device)
    return build_training_model(name, num_classes, device=device)


def _one(name: str, steps: int, batch: int, device: str, train: bool) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from napari_masam.training import TrainingCase, TrainingConfig, iter_train

    model = _model(name, 2, device)
    size = model.image_size
    rng = np.random.default_rng(0)
    depth = 10 * batch
    labels = np.zeros((depth, size, size), np.uint8)
    labels[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    labels[:, size // 2 + 4 : -4, size // 2 + 4 : -4] = 2
    image = (labels * 80.0 + rng.normal(0, 10, labels.shape)).astype(np.float32)
    cases = [TrainingCase(image, labels, "bench")]
    out: dict = {"model": name, "device": device}
    if train:
        config = TrainingConfig(
            epochs=1,
            batch_size=batch,
            max_steps_per_epoch=steps + 1,
            val_every_epochs=1000,
            warmup_steps=1,
        )
        gen = iter_train(model, cases, config, val_cases=cases, device=device)
        next(gen)  # first step: allocations, lazy init
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            p = next(gen)
            if p.stage != "train":
                break
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["steps_per_s"] = steps / (time.perf_counter() - t0)
        gen.close()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out.update(total=total, trainable=trainable, slices_per_step=batch * model.slices_per_group)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(name: str, steps: int, batch: int, device: str, train: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(steps), "--batch", str(batch)]
    cmd += ["--device", device] + ([] if train else ["--no-train"])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_step(rounds: int) -> None:
    """Seconds per MA-SAM-Lite step by input size, interleaved (noise hits every size alike)."""
    import numpy as np
    import torch

    from napari_masam.training import (
        TrainingConfig,
        build_training_model,
        defaults_for_device,
        masam_loss,
    )
    from napari_masam.training.models import apply_trainable, trainable_parameter_names

    sizes = (256, 192, 128, 96)
    config = TrainingConfig()
    runs = {}
    for size in sizes:
        model = build_training_model("masam-lite", 2, image_size=size, device="cpu")
        apply_trainable(model, trainable_parameter_names(model))
        params = [p for p in model.parameters() if p.requires_grad]
        runs[size] = (model.train(), torch.optim.AdamW(params, lr=config.lr))
    times: dict[int, list[float]] = {s: [] for s in sizes}
    cpu_times: dict[int, list[float]] = {s: [] for s in sizes}
    gen = torch.Generator().manual_seed(0)
    for r in range(rounds + 1):  # round 0 warms up (allocations, lazy init)
        for size in sizes:
            model, opt = runs[size]
            x = torch.rand(1, 5, 3, size, size, generator=gen)
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(x, None)
            target = torch.randint(0, 3, (5, *logits.shape[-2:]), generator=gen)
            loss = masam_loss(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r:
                times[size].append(time.perf_counter() - t0)
                cpu_times[size].append(time.process_time() - c0)
    cpu = defaults_for_device("cpu")
    steps = cpu.epochs * (cpu.max_steps_per_epoch or 1)
    print(f"MA-SAM-Lite step on CPU ({torch.get_num_threads()} threads, batch 1 x 5 slices)")
    print("  (CPU-s: process time, robust to other load; wall s: what a user waits here)")
    base = float(np.median(times[256]))
    for size in sizes:
        med, cpu_s = float(np.median(times[size])), float(np.median(cpu_times[size]))
        mark = "  <- CPU default" if size == cpu.image_size else ""
        print(
            f"  {size:>4} px: {cpu_s:6.1f} CPU-s, {med:7.2f} wall s/step ({med / base:.2f} x "
            f"256 px); {steps} steps = {steps * cpu_s / 60:.1f} CPU-min{mark}"
        )


def _param_table() -> list[tuple[str, int, int]]:
    import torch

    from napari_masam.model.masam import build_masam
    from napari_masam.training import trainable_parameter_names

    rows = []
    torch.manual_seed(0)
    vit_b = build_masam("vit_b", num_classes=12)
    names = set(trainable_parameter_names(vit_b))
    rows.append(
        (
            "vit_b (512 px, 12 classes)",
            sum(p.numel() for p in vit_b.parameters()),
            sum(p.numel() for n, p in vit_b.named_parameters() if n in names),
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, skip the 256 px lite")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-step", action="store_true", help="CPU step time by input size")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of --cpu-step")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_step:
        _cpu_step(args.rounds)
        return
    if args.one:
        print(json.dumps(_one(args.one, args.steps, args.batch, args.device, not args.no_train)))
        return

    plan = [
        ("tiny", 10 if args.quick else 20, 2),
        ("tiny_train", 10 if args.quick else 20, 2),
        ("masam-lite-64", 2 if args.quick else 5, 1),
    ]
    if not args.quick:
        plan.append(("masam-lite", 2, 1))
    if args.device.startswith("cuda"):
        plan.append(("vit_b", 5, 4))
    print(f"training throughput on {args.device} (steps of batch x 5 slices, recipe loss + AdamW)")
    print(
        f"{'model':>15} {'slices/step':>11} {'steps/s':>8} {'peak MB':>8} {'overhead MB':>11} "
        f"{'trainable/total':>22}"
    )
    for name, steps, batch in plan:
        base = _child(name, steps, batch, args.device, train=False)
        run = _child(name, steps, batch, args.device, train=True)
        share = run["trainable"] / run["total"]
        ratio = f"{run['trainable'] / 1e6:.2f}M/{run['total'] / 1e6:.2f}M ({share:.1%})"
        peak = run.get("cuda_peak_mb", run["peak_rss_mb"])
        print(
            f"{name:>15} {run['slices_per_step']:>11} {run['steps_per_s']:>8.3f} {peak:>8.0f} "
            f"{run['peak_rss_mb'] - base['peak_rss_mb']:>11.0f} {ratio:>22}"
        )
    print("\nparameter-efficient share (spec vit_b: 30.1 M trainable of 117.4 M = 25.7 %)")
    for label, total, trainable in _param_table():
        print(
            f"  {label}: {trainable / 1e6:.1f} M trainable of {total / 1e6:.1f} M "
            f"= {trainable / total:.1%}"
        )


if __name__ == "__main__":
    main()
