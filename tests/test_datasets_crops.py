"""Crop mode of the folder dataset: scans resampled to a spacing, cached per scan, read as crops.

The crop reader and sampler are checked on hand-made volumes; the folder plugin on small NIfTI and
PNG folders with known spacings, masks and labels; the engine on a resumed crop run.
"""

import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch

from medformer_core import CropSplit, DatasetInfo, Volume
from medformer_core.api.crops import crop_start, read_crop
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import UsageError

nib = pytest.importorskip("nibabel")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))


# -- the crop reader and sampler -------------------------------------------------------------------


def test_read_crop_copies_the_window_and_pads_outside():
    array = np.arange(2 * 5 * 6 * 7, dtype=np.uint8).reshape(2, 5, 6, 7)
    inside = read_crop(array, np.array([1, 2, 3]), (3, 3, 4))
    assert np.array_equal(inside, array[:, 1:4, 2:5, 3:7])
    padded = read_crop(array, np.array([-2, 0, 5]), (8, 6, 4))  # depth centred, width runs off the end
    assert padded.shape == (2, 8, 6, 4)
    assert np.array_equal(padded[:, 2:7, :, :2], array[:, :, :, 5:7])
    assert padded[:, :2].max() == 0 and padded[:, 7:].max() == 0 and padded[..., 2:].max() == 0


def volume_on_disk(tmp_path, shape, name="v", mask=None, foreground=None) -> Volume:
    image = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape((1,) + shape)
    np.save(tmp_path / f"{name}.npy", image)
    mask_path = None
    if mask is not None:
        mask_path = tmp_path / f"{name}_mask.npy"
        np.save(mask_path, mask)
    points = np.zeros((0, len(shape)), np.int32) if foreground is None else np.asarray(foreground, np.int32)
    return Volume(tmp_path / f"{name}.npy", (1,) + shape, points, mask_path)


@pytest.mark.parametrize("seed", range(5))
def test_crop_start_stays_inside_and_holds_the_foreground_voxel(tmp_path, seed):
    volume = volume_on_disk(tmp_path, (20, 30, 9), foreground=[[17, 2, 4]])
    rng = np.random.default_rng(seed)
    for _ in range(20):
        start = crop_start(volume, (8, 8, 12), 1.0, rng)
        assert 0 <= start[0] <= 12 and 0 <= start[1] <= 22
        assert start[2] == -1  # 9 voxels in a 12-voxel crop: centred, padded
        assert start[0] <= 17 < start[0] + 8 and start[1] <= 2 < start[1] + 8


def crop_split(tmp_path, random=True, crops=3, labels=None, seed=0) -> CropSplit:
    mask = np.zeros((16, 12, 10), np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    volumes = [volume_on_disk(tmp_path, (16, 12, 10), "a", mask, [[5, 5, 5]]),
               volume_on_disk(tmp_path, (6, 20, 20), "b", np.ones((6, 20, 20), np.uint8))]
    info = DatasetInfo("crops", 3, 1, (8, 8, 8), mask_labels={0: "background", 1: "organ"})
    return CropSplit.of(info, volumes, crops, labels, random=random, seed=seed, workers=2)


def test_crop_split_batches_crops_with_their_masks_and_labels(tmp_path):
    split = crop_split(tmp_path, labels=np.array([[0], [1]]))
    assert len(split) == 6 and split.has_masks
    batch = split.batch([5, 0, 3])
    assert batch["image"].shape == (3, 1, 8, 8, 8) and batch["mask"].shape == (3, 8, 8, 8)
    assert batch["label"].tolist() == [[0], [1], [1]]  # sorted positions: volume a, then b twice
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"][1:, :1].sum() == 0 and batch["mask"][1:, 1:7].min() == 1  # b: 6 slices padded to 8


def test_training_crops_change_and_resume_exactly_evaluation_crops_are_fixed(tmp_path):
    train = crop_split(tmp_path)
    first, second = train.batch(range(6))["image"], train.batch(range(6))["image"]
    assert not torch.equal(first, second)
    state = train.state_dict()
    expected = train.batch(range(6))["image"]
    resumed = crop_split(tmp_path, seed=123)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(resumed.batch(range(6))["image"], expected)

    evaluation = train.for_evaluation()
    fixed = evaluation.batch(range(6))["image"]
    assert torch.equal(evaluation.batch(range(6))["image"], fixed)
    assert torch.equal(evaluation.subset(np.array([1, 4])).batch([0, 1])["image"], fixed[[1, 4]])


def test_volume_subset_keeps_every_crop_of_the_chosen_volumes(tmp_path):
    split = crop_split(tmp_path, crops=4).volume_subset(np.array([1]))
    assert len(split) == 4 and set(split.slots[:, 0].tolist()) == {1}


# -- the folder plugin in crop mode ----------------------------------------------------------------

SCANS = [((30, 20, 10), (1.0, 1.0, 3.0)), ((24, 24, 24), (1.5, 1.5, 1.5)), ((12, 40, 16), (2.0, 0.75, 2.0))]


def write_scans(root, with_masks=True, labels=None):
    """NIfTI scans (x, y, z voxels and spacing as SCANS) with a bright box and its mask."""
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i, (shape, spacing) in enumerate(SCANS):
        mask = np.zeros(shape, np.uint8)
        centre = np.array(shape) // 2
        mask[tuple(slice(c - max(1, n // 5), c + max(1, n // 5)) for c, n in zip(centre, shape))] = 1
        image = (rng.random(shape) * 100 + 400.0 * mask).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), images / f"case{i}.nii.gz")
        if with_masks:
            nib.save(nib.Nifti1Image(mask, affine), masks / f"case{i}.nii.gz")
    if with_masks:
        (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "box"}}))
    else:
        masks.rmdir()
    if labels:
        rows = [f"imagesTr/case{i}.nii.gz,{label}" for i, label in enumerate(labels)]
        (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return root


def folder(root, settings="", split="train", **options):
    factory, resolved = resolve_dataset(f"folder:{root},val=0,test=0{settings}", **options)
    return factory.info(resolved), factory.build(split, resolved)


def test_scans_are_resampled_to_the_spacing_and_read_as_crops(tmp_path):
    info, split = folder(write_scans(tmp_path / "scans"), ",spacing=1.5,crop=16x12x8,crops=2")
    assert info.size == (8, 12, 16) and info.spacing == (1.5, 1.5, 1.5)  # given x, y, z; held [Z, Y, X]
    assert info.split_sizes["train"] == 6 and len(split) == 6
    grids = sorted(v.spatial for v in split.volumes)
    assert grids == sorted([(20, 13, 20), (24, 24, 24), (21, 20, 16)])  # extent / 1.5 mm, [Z, Y, X]
    batch = split.batch(range(6))
    assert batch["image"].shape == (6, 1, 8, 12, 16) and batch["mask"].shape == (6, 8, 12, 16)
    image, mask = batch["image"][:, 0], batch["mask"]
    assert image[mask > 0].mean() > image[mask == 0].mean() + 0.3  # the mask sits on the bright box


def test_datasets_info_shows_crops_in_scanner_order(tmp_path, run_cli):
    root = write_scans(tmp_path / "scans")
    code, out, _ = run_cli("datasets", "info", f"folder:{root},spacing=1x1x2,crop=16x12x8")
    assert code == 0 and "1 channel(s) x 16x12x8 (3D; x, y, z)" in out
    assert "spacing: 1x1x2 mm" in out and "masks:   0: background, 1: box" in out


def test_native_spacing_keeps_each_scans_grid(tmp_path):
    info, split = folder(write_scans(tmp_path / "scans"), ",crop=8")
    assert info.spacing is None and info.size == (8, 8, 8)
    assert sorted(v.spatial for v in split.volumes) == sorted([(10, 20, 30), (24, 24, 24), (16, 40, 12)])


def test_foreground_crops_hold_foreground(tmp_path):
    _, split = folder(write_scans(tmp_path / "scans"), ",spacing=1,crop=8,foreground=1,crops=8")
    masks = split.batch(range(len(split)))["mask"]
    assert (masks.flatten(1).amax(dim=1) == 1).all()


def test_prepared_scans_come_from_the_cache(tmp_path, monkeypatch):
    root = write_scans(tmp_path / "scans")
    folder(root, ",spacing=2,crop=8")
    import medformer_plugins.folder_volumes as volumes

    monkeypatch.setattr(volumes, "read_sample", lambda *a: pytest.fail("a cached scan was read again"))
    _, split = folder(root, ",spacing=2,crop=12,crops=3,foreground=0")  # crop settings do not re-prepare
    assert len(split) == 9


def test_concurrent_preparation_of_one_scan_happens_once(tmp_path, monkeypatch):
    import medformer_plugins.folder_volumes as volumes

    root = write_scans(tmp_path / "scans")
    calls, real = [], volumes._prepared_arrays

    def counted(*args):
        calls.append(args[0].key)
        return real(*args)

    monkeypatch.setattr(volumes, "_prepared_arrays", counted)
    splits, errors = [], []

    def build():
        try:
            splits.append(folder(root, ",spacing=2,crop=8,workers=3")[1])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(splits) == 3
    assert sorted(calls) == sorted(f"imagesTr/case{i}.nii.gz" for i in range(3))


def test_label_fraction_keeps_whole_scans(tmp_path):
    root = write_scans(tmp_path / "scans", labels=["a", "b", "a"])
    _, split = folder(root, ",spacing=2,crop=8,crops=5", label_fraction=0.34, seed=1)
    assert len(split) % 5 == 0 and 0 < len(split) < 15
    assert all((split.slots[:, 0] == v).sum() == 5 for v in np.unique(split.slots[:, 0]))
    assert split.batch(range(len(split)))["label"].shape == (len(split), 1)


def test_small_scans_are_padded_and_said_once(tmp_path, caplog):
    root = write_scans(tmp_path / "scans")
    factory, options = resolve_dataset(f"folder:{root},val=0,test=0,crop=32")
    with caplog.at_level(logging.WARNING, logger="medformer.data"):
        split = factory.build("train", options)
        factory.build("train", options)
    notes = [r.message for r in caplog.records if "smaller than the crop" in r.message]
    assert len(notes) == 1 and "3 scan(s)" in notes[0] and "padded with zeros" in notes[0]
    assert split.batch([0])["image"].shape == (1, 1, 32, 32, 32)


def test_two_dimensional_pictures_take_crops(tmp_path):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    for i, size in enumerate([(50, 40), (30, 64)]):
        Image.fromarray(np.full(size[::-1], 60 + 50 * i, np.uint8)).save(tmp_path / "pics" / f"p{i}.png")
    info, split = folder(tmp_path / "pics", ",crop=32x24")
    assert info.spatial_dims == 2 and info.size == (24, 32)
    assert split.batch(range(len(split)))["image"].shape == (len(split), 1, 24, 32)


@pytest.mark.parametrize("settings, message", [
    (",size=32,crop=16", "give one of them"),
    (",slices=axial,crop=16", "not from slices"),
    (",crop=16x16", "2 numbers for 3D scans"),
    (",spacing=fine", "spacing must be a number"),
    (",crop=4", "crop must be one to three numbers >= 8"),
])
def test_bad_crop_settings_are_one_line_usage_errors(tmp_path, settings, message):
    root = write_scans(tmp_path / "scans", with_masks=False)
    with pytest.raises(UsageError, match=message) as error:
        folder(root, settings)
    assert "\n" not in str(error.value)


# -- the engine on crops ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_crop_run_matches_an_uninterrupted_one(tmp_path, run_cli):
    root = write_scans(tmp_path / "scans", with_masks=False)
    config = tmp_path / "run.toml"
    config.write_text("checkpoint_every = 2\nlog_every = 1\npicture_every = 100\n")
    args = ["--dataset", f"folder:{root},val=0,test=0,spacing=2,crop=8,crops=4", "--plugin", "mae3d",
            "--batch-size", "4", "--quiet", *(f"--model-option={o}" for o in ("embed_dim=32", "depth=1", "heads=2",
                                                                           "latents=8"))]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    code, _, err = run_cli("train", *args, "--steps", "4", "--config", str(config), "--out", str(full))
    assert code == 0, err
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:3]  # the chance levels, steps 1 and 2
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli("train", *args, "--steps", "4", "--out", str(resumed), "--resume")
    assert code == 0, err

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["losses"]["mae3d"] for r in records if "losses" in r}

    assert sorted(losses(resumed)) == [1, 2, 3, 4]
    assert losses(resumed)[4] == pytest.approx(losses(full)[4], rel=1e-5)


@pytest.mark.slow
def test_predict_resamples_to_the_training_spacing_and_back(tmp_path, run_cli):
    root = write_scans(tmp_path / "scans")
    run = tmp_path / "run"
    args = ["finetune", "--task", "segmentation", "--dataset", f"folder:{root},val=0.34,test=0,spacing=2,crop=8",
            "--device", "cpu", "--out", str(tmp_path / "no-test")]
    code, _, err = run_cli(*args)
    assert code == 2 and "empty test split" in err and len(err.strip().splitlines()) == 1
    rows = [f"imagesTr/case{i}.nii.gz,,{split}" for i, split in enumerate(("train", "val", "test"))]
    (root / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    code, _, err = run_cli("finetune", "--task", "segmentation", "--dataset",
                           f"folder:{root},spacing=2,crop=8,crops=4", "--epochs", "1",
                           "--batch-size", "4", "--device", "cpu", "--model-option", "embed_dim=32", "--model-option",
                           "depth=1", "--model-option", "heads=2", "--model-option", "latents=8", "--quiet",
                           "--out", str(run))
    assert code == 0, err
    scan = root / "imagesTr" / "case0.nii.gz"  # 30 x 20 x 10 voxels of 1 x 1 x 3 mm: 15 x 10 x 15 at 2 mm
    code, _, err = run_cli("predict", str(run), "--input", str(scan), "--out", str(tmp_path / "masks"))
    assert code == 0, err
    mask, source = nib.load(tmp_path / "masks" / "case0.nii.gz"), nib.load(scan)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_the_knn_monitor_scores_fixed_crops(tmp_path, tiny_model):
    from medformer_core.api.plugins import registries
    from medformer_core.engine.knn import KnnMonitor

    root = write_scans(tmp_path / "scans", with_masks=False, labels=["a", "b", "a"])
    _, train = folder(root, ",spacing=2,crop=8,crops=4")
    assert train.random
    model = tiny_model([registries().tasks.get("rotation")], [train.info])
    monitor = KnnMonitor(train, train, k=1)
    assert not monitor.train.random and not monitor.val.random
    first = monitor.evaluate(model.encoder, torch.device("cpu"))
    assert first["acc"] == 1.0 and monitor.evaluate(model.encoder, torch.device("cpu")) == first


def test_new_scans_are_scaled_with_the_folders_intensity_settings(tmp_path):
    root = write_scans(tmp_path / "scans", with_masks=False)
    factory, options = resolve_dataset(f"folder:{root},intensity=ct,window=40:400,crop=8")
    hu = np.array([[[-1000, -160, 40, 240, 1000]]], np.int16)  # [C, 1, 5]: the window spans -160..240 HU
    np.testing.assert_allclose(factory.scale_intensities(hu, options)[0, 0], [0, 0, 0.5, 1, 1])
    default, _ = resolve_dataset("phantoms3d")
    np.testing.assert_allclose(default.scale_intensities(hu, options)[0, 0], [0, 0.42, 0.52, 0.62, 1])
