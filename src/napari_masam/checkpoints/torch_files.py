"""Reading PyTorch checkpoint files (``.pth``/``.pt``): CPU, weights only, code refused.

Every torch file is read with ``torch.load(path, map_location="cpu", weights_only=True)``:
checkpoints saved on a GPU open on any machine and cannot run code.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CheckpointError, PathLike, _torch

if TYPE_CHECKING:
    import torch


def load_weights_only(path: PathLike, *, what: str = "checkpoint", mmap: bool = True) -> Any:
    """Whatever a torch file holds, loaded on the CPU with ``weights_only=True`` (no code runs).

    With ``mmap`` (default) zip-format files are memory-mapped: tensors are paged in when used.
    Pass ``mmap=False`` for a file that will be replaced while its tensors live on (Windows
    cannot replace a mapped file).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        Truncated or not a torch file, or carrying executable code (said in plain words; the
        file is never loaded another way).
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} does not exist (or is not a file).")
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_code_message(path, what, str(exc))) from None
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read the {what} {path}: the file is truncated, corrupted or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download it again or check that you picked the right file."
        ) from exc


def read_state_dict(path: PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a torch checkpoint file, on the CPU.

    Loads with ``map_location="cpu", weights_only=True`` (files saved on CUDA load anywhere; no
    code runs), memory-mapped for zip-format files (``mmap=True``: tensors are paged in from the
    file when used, so reading costs no more memory than the file really holds). A dict
    wrapping the state under ``"state_dict"`` or ``"model"`` is unwrapped.

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
        If the file is truncated, not a torch file, carries executable code (a pickled
        reference to a Python function or class: refused, never run), or does not hold a flat
        dict of tensors.
    """
    torch = _torch()
    obj = load_weights_only(path, what=what)
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


#: Modules whose globals a plain state dict pickles (tensor rebuilding, ordered dicts).
_TENSOR_MODULES = ("torch.", "collections.", "_codecs.", "numpy.core.multiarray.")


def _pickled_globals(path: Path) -> list[str]:
    """``module.name`` of every global a torch zip file's pickle refers to (nothing is run).

    Empty for files that are not zip archives or whose pickle cannot be parsed.
    """
    import pickletools

    try:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(member)
    except (OSError, zipfile.BadZipFile, StopIteration):
        return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace("__builtin__ ", "builtins ").replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: nothing more to say about it
        pass
    return names


def _code_message(path: Path, what: str, torch_message: str) -> str:
    """Plain words for a file the weights-only unpickler refused (torch's advice left out)."""
    names = [n for n in _pickled_globals(path) if not n.startswith(_TENSOR_MODULES)]
    found = re.search(r"GLOBAL\s+([\w.]+)", torch_message)
    if names or found:
        carries = f"executable code (a reference to the Python callable {(names or [found[1]])[0]})"
    else:
        carries = "Python objects other than tensors, which can carry executable code"
    return (
        f"The {what} {path} contains {carries} and will not be loaded: napari-masam opens only "
        "checkpoints that hold tensors, so that opening a file cannot run code. Ask whoever made "
        "it for a weights-only file (torch.save(model.state_dict(), ...)) or a napari-masam "
        ".safetensors model."
    )
