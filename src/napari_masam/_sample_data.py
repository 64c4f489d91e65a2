"""napari sample data contributions: a real head MRI, a synthetic CT phantom, a real video clip.

Sources and licences: ``napari_masam/data/README.txt``. Each function returns napari
``LayerData`` tuples; nothing here needs a network.
"""

from __future__ import annotations

from typing import Any

LayerData = tuple[Any, dict[str, Any], str]


def make_sample_volume() -> list[LayerData]:
    """Colin27 T1 head MRI (2 mm, RAS file) as an Image layer in the display orientation."""
    from ._reader import read_nifti_layers
    from .io.sample_data import head_mri_path

    layers = read_nifti_layers(str(head_mri_path()), as_labels=False)
    if not layers:
        raise ValueError("the shipped head MRI could not be read; reinstall napari-masam")
    data, kwargs, kind = layers[0]
    kwargs["name"] = "head_mri"
    return [(data, kwargs, kind)]


def make_sample_phantom() -> list[LayerData]:
    """Synthetic abdominal CT (HU) and its exact organ labels, with class names."""
    import nibabel as nib
    import numpy as np

    from .io.nifti import RAS_TO_DISPLAY, volume_from_image
    from .io.sample_data import make_ct_phantom
    from .palette import label_rgb_table

    ph = make_ct_phantom()
    # the geometry of a RAS file with this display, so that saving the layers writes that file
    world = np.eye(4)
    world[:3, :3] = np.diag(ph.spacing_zyx)
    world[:3, 3] = ph.translate_zyx
    to_ras = np.eye(4)
    to_ras[:3, :3] = RAS_TO_DISPLAY.T

    def ras_image(arr: np.ndarray) -> nib.Nifti1Image:
        img = nib.as_closest_canonical(nib.Nifti1Image(arr, to_ras @ world))
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        return img

    image_vol = volume_from_image(ras_image(ph.image_hu), as_labels=False)
    label_vol = volume_from_image(ras_image(ph.labels), as_labels=True)
    colors = label_rgb_table(len(ph.class_names) - 1)
    class_colors = {i: (*(int(c) for c in colors[i]), 255) for i in range(1, len(ph.class_names))}
    image_kwargs = {
        "name": "ct_phantom",
        "scale": image_vol.scale,
        "translate": image_vol.translate,
        "contrast_limits": (-200, 250),
        "metadata": {
            "nifti": image_vol.metadata,
            "intensity_preset": "ct_abdomen",
            "physical_unit": "mm",
        },
        "units": ("mm", "mm", "mm"),
    }
    labels_kwargs = {
        "name": "ct_phantom_labels",
        "scale": label_vol.scale,
        "translate": label_vol.translate,
        "metadata": {
            "nifti": label_vol.metadata,
            "physical_unit": "mm",
            "class_names": list(ph.class_names),
            "class_colors": {k: list(v) for k, v in class_colors.items()},
        },
        "features": {"class_name": list(ph.class_names)},
        "units": ("mm", "mm", "mm"),
    }
    return [(image_vol.data, image_kwargs, "image"), (label_vol.data, labels_kwargs, "labels")]


def make_sample_video() -> list[LayerData]:
    """The first 3 s of Big Buck Bunny (CC BY 3.0, Blender Foundation), 320 x 180, lazily."""
    from ._reader import read_video_layers
    from .io.sample_data import sample_video_path

    layers = read_video_layers(str(sample_video_path()))
    if not layers:
        raise ValueError("the shipped video could not be read; reinstall napari-masam")
    data, kwargs, kind = layers[0]
    kwargs["name"] = "video"
    return [(data, kwargs, kind)]
