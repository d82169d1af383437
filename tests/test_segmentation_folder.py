"""Segmentation masks in the folder dataset: the Decathlon layout, image/label pairs (NIfTI and
PNG), and the one-line errors for a bad mask, each naming the file."""

import json

import numpy as np
import pytest

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import DataError

nib = pytest.importorskip("nibabel")
SHAPE = (12, 10, 8)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))


def volume_and_mask(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:9, 2:7, 2:6] = 1
    mask[4:8, 3:6, 3:5] = 2
    return (rng.random(SHAPE) * 0.3 + 0.6 * (mask > 0)).astype(np.float32), mask


def write_msd(root, cases=4, labels=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        image, mask = volume_and_mask(i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "labelsTr" / f"case{i}.nii.gz")
    labels = labels or {"0": "background", "1": "organ", "2": "lesion"}
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def build(root, split="train"):
    factory, options = resolve_dataset(f"folder:{root},size=8,val=0,test=0")
    return factory.build(split, options)


def test_decathlon_layout_gives_masks_aligned_with_images(tmp_path):
    split = build(write_msd(tmp_path / "Task01"))
    assert split.info.mask_labels == {0: "background", 1: "organ", 2: "lesion"}
    assert len(split) == 4 and split.masks.shape == (4, 8, 8, 8)
    batch = split.batch(range(4))
    image, mask = batch["image"][:, 0], batch["mask"]
    assert set(mask.unique().tolist()) == {0, 1, 2}
    assert image[mask > 0].mean() > image[mask == 0].mean() + 0.3  # the mask sits on the bright region


def test_image_label_pairs_in_nifti_and_png(tmp_path):
    from PIL import Image

    for i in range(3):
        case = tmp_path / "nifti" / f"case{i}"
        case.mkdir(parents=True)
        image, mask = volume_and_mask(i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), case / "image.nii.gz")
        nib.save(nib.Nifti1Image(np.minimum(mask, 1), np.eye(4)), case / "label.nii.gz")
        flat = tmp_path / "png" / f"case{i}"
        flat.mkdir(parents=True)
        Image.fromarray((image[:, :, 4] * 255).astype(np.uint8)).save(flat / "image.png")
        Image.fromarray(np.minimum(mask[:, :, 4], 1)).save(flat / "mask.png")
    volumes = build(tmp_path / "nifti")
    assert volumes.masks.shape == (3, 8, 8, 8) and volumes.info.mask_labels == {0: "background", 1: "foreground"}
    pictures = build(tmp_path / "png")
    assert pictures.info.spatial_dims == 2 and pictures.masks.shape == (3, 8, 8)


def one_line_error(root, match: str) -> str:
    with pytest.raises(DataError) as error:
        build(root)
    text = str(error.value)
    assert "\n" not in text and match in text and "(" in text  # one line, with a hint
    return text


def test_a_mask_of_another_shape_is_an_error_naming_it(tmp_path):
    root = write_msd(tmp_path / "Task")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), root / "labelsTr" / "case2.nii.gz")
    assert "labelsTr/case2.nii.gz" in one_line_error(root, "mask shape")


def test_a_mask_with_another_affine_is_an_error_naming_it(tmp_path):
    root = write_msd(tmp_path / "Task")
    _, mask = volume_and_mask(1)
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 1, 1, 1])), root / "labelsTr" / "case1.nii.gz")
    assert "labelsTr/case1.nii.gz" in one_line_error(root, "affine")


def test_an_empty_mask_is_an_error_naming_it(tmp_path):
    root = write_msd(tmp_path / "Task")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), root / "labelsTr" / "case0.nii.gz")
    assert "labelsTr/case0.nii.gz" in one_line_error(root, "empty")


def test_a_label_outside_the_declared_classes_is_an_error_naming_it(tmp_path):
    root = write_msd(tmp_path / "Task", labels={"0": "background", "1": "organ"})
    assert "labelsTr/case0.nii.gz" in one_line_error(root, "mask value 2 is outside the classes [0, 1]")


def test_a_labels_csv_can_name_each_images_mask(tmp_path):
    root = tmp_path / "scans"
    (root / "ct").mkdir(parents=True)
    (root / "seg").mkdir()
    rows = ["path,mask,split"]
    for i in range(3):
        image, mask = volume_and_mask(i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "ct" / f"patient{i}.nii.gz")
        nib.save(nib.Nifti1Image((mask > 0).astype(np.uint8), np.eye(4)), root / "seg" / f"p{i}_organ.nii.gz")
        rows.append(f"ct/patient{i}.nii.gz,seg/p{i}_organ.nii.gz,{'train' if i < 2 else 'test'}")
    rows.append("ct/patient9.nii.gz,seg/missing.nii.gz,train")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    factory, options = resolve_dataset(f"folder:{root},size=8")
    info = factory.info(options)
    assert info.mask_labels == {0: "background", 1: "foreground"} and info.labels == {}
    assert info.split_sizes == {"train": 2, "val": 0, "test": 1}
    batch = factory.build("train", options).batch(range(2))
    image, mask = batch["image"][:, 0], batch["mask"]
    assert image[mask > 0].mean() > image[mask == 0].mean() + 0.3
