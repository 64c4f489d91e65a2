"""Every checkpoint format in and out, and where a model comes from.

Modules
-------
- :mod:`.keys`: the one place key names are mapped (Meta SAM, the MA-SAM authors', ours).
- :mod:`.torch_files`: reading ``.pth`` files (CPU, weights only; files carrying code refused).
- :mod:`.sam_pair`: MA-SAM from Meta's SAM base + the authors' MA-SAM file, and back.
- :mod:`.ours`: our single safetensors file (full state, config + metadata in the header).
- :mod:`.sources`: :class:`ModelSource`, the one value that says where a model comes from,
  :func:`load_model`, and the ``masam_vit_*`` registry builders.

Importing this package imports no torch.
"""

from __future__ import annotations

from ._common import CheckpointError, PathLike
from .keys import (
    authors_checkpoint_state_dict,
    authors_state_dict,
    from_authors_key,
    sam_key_to_masam,
    to_authors_key,
)
from .ours import (
    FORMAT_NAME,
    FORMAT_VERSION,
    load_checkpoint,
    model_from_config,
    read_checkpoint_header,
    save_checkpoint,
)
from .sam_pair import (
    SAM_FILENAMES,
    copy_matching,
    infer_sam_architecture,
    load_masam,
    resize_pos_embed,
    resize_rel_pos,
    sam_to_masam_state_dict,
    save_authors_checkpoint,
)
from .sources import (
    ModelSource,
    build_masam_preset_vit_b,
    build_masam_preset_vit_h,
    build_masam_preset_vit_l,
    load_model,
)
from .torch_files import read_state_dict

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SAM_FILENAMES",
    "CheckpointError",
    "ModelSource",
    "PathLike",
    "authors_checkpoint_state_dict",
    "authors_state_dict",
    "build_masam_preset_vit_b",
    "build_masam_preset_vit_h",
    "build_masam_preset_vit_l",
    "copy_matching",
    "from_authors_key",
    "infer_sam_architecture",
    "load_checkpoint",
    "load_masam",
    "load_model",
    "model_from_config",
    "read_checkpoint_header",
    "read_state_dict",
    "resize_pos_embed",
    "resize_rel_pos",
    "sam_key_to_masam",
    "sam_to_masam_state_dict",
    "save_authors_checkpoint",
    "save_checkpoint",
    "to_authors_key",
]
