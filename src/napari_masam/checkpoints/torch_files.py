"""Reading PyTorch checkpoint files (``.pth``/``.pt``): CPU, weights only, code refused.

Every torch file is read with ``torch.load(path, map_location="cpu", weights_only=True)``:
checkpoints saved on a GPU open on any machine and cannot run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import CheckpointError, PathLike, _torch

if TYPE_CHECKING:
    import torch


def read_state_dict(path: PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a torch checkpoint file, on the CPU.

    Loads with ``map_location="cpu", weights_only=True`` (files saved on CUDA load anywhere; no
    code runs). A dict wrapping the state under ``"state_dict"`` or ``"model"`` is unwrapped.

    Parameters
    ----------
    path : str or Path
    what : str
        How to call the file in messages (``"SAM checkpoint"``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated, not a torch file, or does not hold a flat dict of tensors.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} does not exist (or is not a file).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read the {what} {path}: the file is truncated, corrupted or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download it again or check that you picked the right file."
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"The {what} {path} holds a {type(obj).__name__}, not a state dict (a flat dict of "
            "named tensors)."
        )
    bad = [
        str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"The {what} {path} is not a flat state dict: {len(bad)} entries are not named "
            f"tensors (e.g. {', '.join(bad[:5])})."
        )
    return {k: v.detach() for k, v in obj.items()}
