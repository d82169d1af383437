"""Segmentation masks in the user's folder: find each image's mask and check the pair.

Layouts: the Medical Segmentation Decathlon's `imagesTr/NAME` + `labelsTr/NAME` (its
`dataset.json` "labels" declares the classes), pairs in one folder, `image.*` beside `label.*`
(or `mask.*`, `seg.*`, `segmentation.*`), NIfTI or PNG, and any pairing a labels CSV names in a
`mask` column (`path,mask`: image path, mask path, both relative to the folder). Without a declaration the
classes are 0 background and 1 foreground. A mask whose shape or affine differs from its image,
an empty mask or a value outside the classes is a one-line DataError naming the mask file.
"""

import json
from pathlib import Path

import numpy as np

from medformer_core import DataError
from medformer_plugins.folder_readers import Sample

MASK_STEMS = ("label", "labels", "mask", "seg", "segmentation")
MSD_FOLDERS = {"labelsTr": "imagesTr", "labelsTs": "imagesTs"}
DEFAULT_CLASSES = {0: "background", 1: "foreground"}


def pair_masks(samples: list[Sample], named: dict[str, str] | None = None,
               ) -> tuple[list[Sample], dict[str, Sample], list[tuple[str, str]]]:
    """Split the found samples into images and masks: (images, {image key: its mask}, skipped).
    `named` ({image key: mask key}, a labels CSV's mask column) pairs first; layouts pair the rest."""
    by_key = {s.key: s for s in samples}
    masks, skipped, taken = {}, [], set()
    for image_key, mask_key in (named or {}).items():
        if mask_key not in by_key:
            skipped.append((mask_key, f"the mask of {image_key} in the labels CSV: not found or not readable"))
            continue
        taken.add(mask_key)
        masks[image_key] = by_key[mask_key]
    for sample in samples:
        if sample.key in taken or sample.key in masks:
            continue
        image_key = _image_key(sample.key, by_key)
        if image_key is None:
            continue
        taken.add(sample.key)
        if image_key in masks:
            continue  # the labels CSV named this image's mask
        if image_key in by_key:
            masks[image_key] = sample
        else:
            skipped.append((sample.key, "a mask without its image"))
    return [s for s in samples if s.key not in taken], masks, skipped


def _image_key(key: str, by_key: dict[str, Sample]) -> str | None:
    """The key of the image `key` is the mask of, when `key` is a mask; else None."""
    parts = key.split("/")
    for mask_folder, image_folder in MSD_FOLDERS.items():
        if mask_folder in parts[:-1]:
            return "/".join(image_folder if p == mask_folder else p for p in parts)
    if _stem(parts[-1]) not in MASK_STEMS:
        return None
    folder = "/".join(parts[:-1])
    images = [k for k in by_key if k.rpartition("/")[0] == folder and _stem(k.rpartition("/")[2]) == "image"]
    return images[0] if images else f"{folder}/image (missing)"


def _stem(name: str) -> str:
    return name.split(".")[0].lower()


def declared_classes(root: Path) -> dict[int, str]:
    """The mask classes: MSD's dataset.json "labels" when the folder has one, else background/foreground."""
    path = root / "dataset.json"
    if not path.is_file():
        return dict(DEFAULT_CLASSES)
    try:
        labels = json.loads(path.read_text())["labels"]
        classes = {int(k): str(v) for k, v in labels.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: no readable \"labels\" table ({type(exc).__name__})",
                        hint='write "labels": {"0": "background", "1": "organ"} as the Decathlon does') from None
    if sorted(classes) != list(range(len(classes))) or len(classes) < 2:
        raise DataError(f"{path}: labels {sorted(classes)} are not 0, 1, ... (at least 2 classes)",
                        hint="number the classes from 0 (the background) without gaps")
    return classes


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], mask_sample: Sample, image_sample: Sample,
               classes: dict[int, str]) -> np.ndarray:
    """A mask read as [1, *S] native values -> [*S] uint8 classes, after checking it against its image."""
    where = mask_sample.paths[0]
    if tuple(mask.shape[1:]) != tuple(image_shape):
        raise DataError(f"{where}: mask shape {tuple(mask.shape[1:])} differs from its image {image_sample.key} "
                        f"{tuple(image_shape)}", hint="resample the mask onto the image's grid")
    _check_affine(mask_sample, image_sample)
    values = np.unique(mask)
    outside = [v for v in values if v != round(v) or int(v) not in classes]
    if outside:
        raise DataError(f"{where}: mask value {outside[0]:g} is outside the classes {sorted(classes)}",
                        hint="declare every class in dataset.json \"labels\", or fix the mask")
    if values.max() == 0:
        raise DataError(f"{where}: the mask is empty (no foreground voxel)",
                        hint="fix the mask, or move the case out of the folder")
    return mask[0].astype(np.uint8)


def _check_affine(mask_sample: Sample, image_sample: Sample) -> None:
    if mask_sample.kind != "nifti" or image_sample.kind != "nifti":
        return
    import nibabel as nib

    mask_affine, image_affine = (nib.load(s.paths[0]).affine for s in (mask_sample, image_sample))
    if not np.allclose(mask_affine, image_affine, atol=1e-3):
        raise DataError(f"{mask_sample.paths[0]}: mask affine differs from its image {image_sample.key}",
                        hint="resample the mask onto the image's grid (same voxel size, origin and orientation)")
