"""What a fine-tuning run writes into its output folder, every file replaced atomically.

Each file goes through :func:`napari_masam.io._common.atomic_path` (a temporary sibling renamed
over the old file when complete): a Ctrl-C, a crash or a full disk while writing leaves the
previous ``best.safetensors``, ``best_authors.pth``, ``resume.pt`` or ``history.json`` intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..io._common import atomic_path
from ..model.base import SegmentationModel

#: File names written into ``output_dir``.
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
AUTHORS_NAME = "best_authors.pth"
STATE_NAME = "resume.pt"
HISTORY_NAME = "history.json"


class RunFolder:
    """The output folder of one run (created on first use); every write is atomic.

    Parameters
    ----------
    path : Path
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_NAME

    def save_state(self, state: dict[str, Any]) -> Path:
        """``resume.pt`` (a plain dict of tensors and strings: loads with weights_only)."""
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)
        return self.state_path

    def load_state(self) -> dict[str, Any] | None:
        """The saved resume state, or None when the folder has none.

        Raises
        ------
        ValueError
            (:class:`~napari_masam.checkpoints.CheckpointError`) The file is damaged or carries
            executable code (refused, never run).
        """
        from ..checkpoints.torch_files import load_weights_only

        if not self.state_path.exists():
            return None
        state = load_weights_only(self.state_path, what="training state", mmap=False)
        if not isinstance(state, dict):
            raise ValueError(f"{self.state_path} is not a napari-masam training state.")
        return state

    def save_model(self, model: SegmentationModel, name: str) -> Path:
        """One of our single-file checkpoints (``best``/``last``)."""
        from ..checkpoints import save_checkpoint

        return save_checkpoint(model, self.path / name)  # atomic itself

    def save_authors(self, model: SegmentationModel) -> Path:
        """``best_authors.pth``: the trainable parts in the MA-SAM authors' format."""
        from ..checkpoints import save_authors_checkpoint

        return save_authors_checkpoint(model, self.path / AUTHORS_NAME)  # type: ignore[arg-type]

    def save_history(self, history: list[dict[str, Any]]) -> Path:
        """``history.json``: per epoch loss, learning rate and validation Dice."""
        path = self.path / HISTORY_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(history, indent=1))
        return path
