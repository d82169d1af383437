"""Segmentation: Dice loss and metric, phantom masks, sliding-window inference, a tiny fine-tune on
phantoms end to end, and `medformer predict` writing NIfTI masks with the input's geometry."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medformer_core.api.data import DatasetOptions
from medformer_core.api.plugins import registries
from medformer_core.downstream.sliding_window import gaussian_importance, sliding_window, window_starts
from medformer_core.engine.dice import dice_per_class, soft_dice_loss, summarize_dice

TINY_RUN = ["finetune", "--task", "segmentation", "--dataset", "phantoms3d:size=8,count=16", "--epochs", "2",
            "--batch-size", "8", "--device", "cpu", "--model-option", "embed_dim=32", "--model-option", "depth=1",
            "--model-option", "heads=2", "--model-option", "latents=8", "--quiet"]


def test_dice_per_class_on_hand_made_masks():
    target = torch.tensor([[[0, 1, 1, 2]]])  # [B=1, 1, 4]: class 2 once, class 3 nowhere
    prediction = torch.tensor([[[0, 1, 0, 2]]])
    scores = dice_per_class(prediction, target, 4)[0]
    assert scores[1].item() == pytest.approx(2 * 1 / (1 + 2))
    assert scores[2].item() == 1.0
    assert math.isnan(scores[3].item())  # absent from both: not scored


def test_summarize_dice_leaves_out_unscored_classes():
    scores = np.array([[1.0, 0.5, np.nan], [1.0, 1.0, np.nan]])
    summary = summarize_dice(scores, {0: "background", 1: "organ", 2: "tumour"})
    assert summary["dice"]["organ"] == pytest.approx(0.75)
    assert math.isnan(summary["dice"]["tumour"])
    assert summary["mean_dice"] == pytest.approx(0.75)


def test_soft_dice_loss_values():
    target = torch.tensor([[0, 1, 1, 0]])  # [B=1, S=4]
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50  # [1, 3, 4]
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)  # class 2 empty: no loss
    uniform = torch.zeros(1, 2, 4)  # p = 0.5 everywhere: dice of class 1 = 2 * 1 / (2 + 2)
    assert soft_dice_loss(uniform, target).item() == pytest.approx(0.5, abs=1e-4)


def test_phantom_masks_are_the_shapes_drawn():
    factory = registries().datasets.get("phantoms3d")
    split = factory.build("train", DatasetOptions(argument="size=16,count=8"))
    assert split.info.mask_labels == {0: "background", 1: "shape"}
    batch = split.batch(range(8))
    image, mask = batch["image"][:, 0], batch["mask"]  # [B, *S] each
    assert mask.shape == image.shape and set(mask.unique().tolist()) == {0, 1}
    for x, m in zip(image, mask):  # the shape differs in intensity from its background
        assert abs(x[m == 1].mean() - x[m == 0].mean()) > 0.2
    unlabeled = factory.build("train", DatasetOptions(argument="size=16,count=8", labeled=False))
    assert unlabeled.masks is None and "mask" not in unlabeled.batch([0])


def test_window_starts_cover_the_axis():
    assert window_starts(8, 8, 0.5) == [0]
    assert window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert window_starts(21, 8, 0.5)[-1] == 13


def test_sliding_window_is_one_pass_when_the_window_covers_the_scan():
    image = torch.rand(1, 8, 8, 8)
    predict = lambda x: torch.cat([x, 1 - x], dim=1) * 3  # noqa: E731  [B, 1, *W] -> [B, 2, *W]
    assert torch.allclose(sliding_window(image, predict, (8, 8, 8)), predict(image[None])[0], atol=1e-6)


def test_gaussian_sliding_window_reconstructs_a_local_function():
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, 20)] * 3, indexing="ij")
    image = (torch.sin(3 * x) + z * y)[None]  # [1, 20, 20, 20]
    out = sliding_window(image, lambda w: 2 * w + 1, (8, 8, 8), overlap=0.5)  # voxel-wise: blends exactly
    assert torch.allclose(out, 2 * image + 1, atol=1e-5)
    small = sliding_window(image[:, :5], lambda w: w, (8, 8, 8))  # smaller than the window: padded, cut back
    assert small.shape == (1, 5, 20, 20) and torch.allclose(small, image[:, :5], atol=1e-5)
    weights = gaussian_importance((8, 8))
    assert weights.max() == 1 and weights.min() > 0 and weights[3, 3] > weights[0, 0]


def test_segment_head_refines_with_the_image_and_decodes_patches_without():
    head = registries().output_heads.get("segment").build(embed_dim=16, channels=1, patch_size=(2, 2), num_classes=3)
    features = torch.randn(2, 6, 16)  # a 2 x 3 grid of 2 x 2 patches
    assert head(features, torch.rand(2, 1, 4, 5)).shape == (2, 3, 4, 5)  # padding cropped off
    assert head(features).shape == (2, 6, 3 * 4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny segmentation fine-tune of 3D phantoms, run through the CLI."""
    from medformer_cli.app import main

    run = tmp_path_factory.mktemp("seg") / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_RUN, "--out", str(run)])
    assert exit_info.value.code in (0, None)
    return run


def test_a_tiny_segmentation_finetune_writes_per_class_dice(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["task"] == "segmentation" and results["epochs"] == 2
    for split in ("val", "test"):
        assert set(results[split]["dice"]) == {"shape"}
        assert 0.0 <= results[split]["mean_dice"] <= 1.0
    assert (tiny_run / "model.safetensors").is_file()


def test_eval_scores_a_segmentation_run(tiny_run, run_cli):
    code, out, _ = run_cli("eval", str(tiny_run), "--split", "val", "--device", "cpu")
    assert code == 0 and "mean Dice" in out
    assert "mean_dice" in json.loads((tiny_run / "eval_val.json").read_text())


def test_predict_writes_nifti_with_the_input_geometry(tiny_run, tmp_path, run_cli):
    nib = pytest.importorskip("nibabel")
    scans = tmp_path / "scans"
    scans.mkdir()
    affine = np.array([[0, 0, 1.5, 10], [-0.8, 0, 0, 5], [0, 1.2, 0, -3], [0, 0, 0, 1]])  # not RAS
    volume = np.random.default_rng(0).random((12, 6, 10)).astype(np.float32)  # one axis under the window
    nib.save(nib.Nifti1Image(volume, affine), scans / "case.nii.gz")
    code, _, err = run_cli("predict", str(tiny_run), "--input", str(scans), "--out", str(tmp_path / "masks"),
                           "--device", "cpu")
    assert code == 0
    assert err.count("Padded") == 1 and "case.nii.gz" in err  # said once
    mask = nib.load(tmp_path / "masks" / "case.nii.gz")
    assert mask.shape == volume.shape and np.allclose(mask.affine, affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert (tmp_path / "masks" / "case_overlay.png").is_file()


def test_predict_refuses_a_classification_run(tmp_path, run_cli):
    (tmp_path / "finetune.toml").write_text('dataset = "phantoms2d"\ntask = "classification"\n')
    code, _, err = run_cli("predict", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "m"))
    assert code == 2 and "classification" in err and len(err.strip().splitlines()) == 1


def test_segmentation_needs_masks(run_cli, tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist")
    code, _, err = run_cli("finetune", "--task", "segmentation", "--dataset", "retinamnist", "--data-root",
                           str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "no segmentation masks" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("affine, spacing", [
    (np.diag([1.5, 1.2, 2.0, 1.0]), (2.0, 1.2, 1.5)),
    (np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -5], [0, 1.2, 0, 3], [0, 0, 0, 1]]), (1.2, 1.5, 2.0)),
], ids=["RAS", "permuted and flipped"])
def test_a_mask_lands_on_the_voxels_it_was_predicted_for(tmp_path, affine, spacing):
    """Read a scan into model orientation and write a mask made from it back: the mask file holds
    the input's own voxels, in the input's voxel order, whatever the affine."""
    nib = pytest.importorskip("nibabel")
    from medformer_core.downstream.predict import read_scan

    voxels = np.random.default_rng(0).integers(0, 3, (7, 9, 5)).astype(np.uint8)  # [X, Y, Z], anisotropic
    nib.save(nib.Nifti1Image(voxels, affine), tmp_path / "scan.nii.gz")
    scan = read_scan(tmp_path / "scan.nii.gz", spatial_dims=3)
    assert scan.spacing == pytest.approx(spacing)  # mm along [Z, Y, X] of scan.array
    written = scan.write_mask(scan.array[0].astype(np.uint8), tmp_path, "mask")  # the scan as its own mask
    back = nib.load(written)
    np.testing.assert_array_equal(np.asarray(back.dataobj), voxels)
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "scan.nii.gz").affine)


def phantom_scan(path: Path, seed: int = 0, nan_voxel: bool = False) -> np.ndarray:
    """A 12^3 NIfTI with a bright ball at `path` (optionally one NaN voxel); returns its voxels."""
    nib = pytest.importorskip("nibabel")
    grid = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"))
    volume = (((grid - 6) ** 2).sum(0) < 12).astype(np.float32) * 800 + np.random.default_rng(seed).random((12,) * 3)
    if nan_voxel:
        volume[0, 0, 0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return volume


def test_predict_never_writes_over_its_input(tiny_run, tmp_path, run_cli):
    scan = tmp_path / "same" / "p.nii.gz"
    phantom_scan(scan)
    before = scan.read_bytes()
    for out in (tmp_path / "same", tmp_path / "same" / "masks"):
        code, _, err = run_cli("predict", str(tiny_run), "--input", str(tmp_path / "same"), "--out", str(out))
        assert code == 2 and "inside --input" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("predict", str(tiny_run), "--input", str(scan), "--out", str(tmp_path / "same"))
    assert code == 2 and "would overwrite the input" in err, err
    assert scan.read_bytes() == before and sorted(p.name for p in scan.parent.iterdir()) == ["p.nii.gz"]


def test_predict_keeps_every_mask_when_names_look_alike(tiny_run, tmp_path, run_cli):
    scans = tmp_path / "scans"
    for name in ("s1/a.nii.gz", "s2/a.nii.gz", "a.v2.nii.gz", "a.v3.nii"):
        phantom_scan(scans / name)
    code, out, err = run_cli("predict", str(tiny_run), "--input", str(scans), "--out", str(tmp_path / "masks"))
    assert code == 0, err
    masks = sorted(str(p.relative_to(tmp_path / "masks")) for p in (tmp_path / "masks").rglob("*.nii.gz"))
    assert masks == ["a.v2.nii.gz", "a.v3.nii.gz", "s1/a.nii.gz", "s2/a.nii.gz"] and "Wrote 4 mask(s)" in out


def test_predict_refuses_two_scans_that_would_share_a_mask(tiny_run, tmp_path, run_cli):
    for name in ("a.nii", "a.nii.gz"):
        phantom_scan(tmp_path / "scans" / name)
    code, _, err = run_cli("predict", str(tiny_run), "--input", str(tmp_path / "scans"), "--out", str(tmp_path / "m"))
    assert code == 2 and "would both write the mask 'a'" in err
    assert not (tmp_path / "m").exists()


def test_one_nan_voxel_does_not_empty_the_scan(tiny_run, tmp_path, run_cli):
    nib = pytest.importorskip("nibabel")
    phantom_scan(tmp_path / "clean" / "p.nii.gz")
    phantom_scan(tmp_path / "nan" / "p.nii.gz", nan_voxel=True)
    masks = {}
    for name in ("clean", "nan"):
        code, _, err = run_cli("predict", str(tiny_run), "--input", str(tmp_path / name), "--out",
                               str(tmp_path / f"{name}-masks"))
        assert code == 0, err
        assert ("1 voxel(s)" in err) == (name == "nan")
        masks[name] = np.asarray(nib.load(tmp_path / f"{name}-masks" / "p.nii.gz").dataobj)
    assert (masks["nan"] != masks["clean"]).mean() < 0.01  # the same mask, give or take the filled voxel


def test_intensity_scaling_leaves_non_finite_voxels_out():
    from medformer_core.api.interfaces import DatasetFactory

    clean = np.linspace(0, 500, 1000, dtype=np.float32).reshape(1, 10, 10, 10)
    dirty = clean.copy()
    dirty[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    scaled = DatasetFactory.scale_intensities(None, dirty, None)
    assert np.isfinite(scaled).all() and (scaled[0, 0, 0, :3] == 0).all()
    assert np.allclose(scaled[0, 5:], DatasetFactory.scale_intensities(None, clean, None)[0, 5:], atol=0.01)
