"""Where the model runs: one resolution of ``"auto"`` and the matching autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Device names usable on this machine, ``"auto"`` first (for menus and ``info``)."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/None into cuda, mps or cpu (in that order); check explicit requests.

    Raises
    ------
    ValueError
        If a named device is not available here (the message lists the ones that are).
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        for name in ("cuda", "mps"):
            if name in available_devices():
                return torch.device(name)
        return torch.device("cpu")
    kind = str(device).split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(f"Unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    if kind not in available_devices():
        raise ValueError(
            f"Device {device!r} is not available on this machine; available: "
            f"{', '.join(available_devices())}."
        )
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA cards that support it, fp16 on other GPUs, None (fp32) on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


@contextlib.contextmanager
def autocast_context(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision for inference on GPUs; a no-op on CPU or when ``enabled`` is False."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
