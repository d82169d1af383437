"""The Colin27 atlas check: its geometry helpers on hand-made volumes, the .deb unpacking without
dpkg, and the quick check end to end on the real templates (skipped when they are unavailable)."""

import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import atlas_data  # noqa: E402

nib = pytest.importorskip("nibabel")


def test_on_grid_follows_the_affines_not_the_voxel_order():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 7, 8)).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-6.0, -4.0, 10.0)
    target = nib.Nifti1Image(np.zeros(labels.shape, np.uint8), affine)
    # The same labels stored x-flipped and padded by 2 voxels on every side: same world positions.
    padded = np.pad(labels[::-1], 2)
    moved = affine @ np.array([[-1, 0, 0, labels.shape[0] - 1 + 2], [0, 1, 0, -2], [0, 0, 1, -2], [0, 0, 0, 1]])
    assert np.array_equal(atlas_data.on_grid(nib.Nifti1Image(padded, moved), target), labels)
    assert not np.array_equal(padded[2:-2, 2:-2, 2:-2], labels)  # the voxel order alone would be wrong


def test_hemispheres_are_disjoint_in_world_x_and_blocks_keep_their_place():
    affine = np.eye(4)
    affine[:3, 3] = (-5.0, 10.0, 20.0)  # voxel i is at x = i - 5
    volume = atlas_data.Part(np.arange(11 * 4 * 3, dtype=np.uint8).reshape(11, 4, 3),
                             np.ones((11, 4, 3), np.uint8), affine)
    left, right = atlas_data.hemispheres(volume)
    assert left.image.shape == (5, 4, 3) and right.image.shape == (6, 4, 3)
    assert left.affine[0, 3] + left.image.shape[0] - 1 < 0 <= right.affine[0, 3]
    block = right.box((1, 2, 1), (2, 2, 2))
    world = block.affine @ np.array([0, 0, 0, 1.0])
    assert np.allclose(world[:3], (1.0, 12.0, 21.0))  # voxel (6, 2, 1) of the volume
    assert block.image[0, 0, 0] == volume.image[6, 2, 1]


def test_every_aal_region_falls_in_one_class(tmp_path):
    names = tmp_path / "aal.nii.txt"
    names.write_text("1 Precentral_L 2001\n71 Caudate_L 7001\n116 Vermis_10 9170\n")
    lookup = atlas_data.aal_lookup(names)
    assert lookup[1] == 1 and lookup[71] == 2 and lookup[116] == 3 and lookup[0] == 0
    names.write_text("1 Brainstem 1\n")
    with pytest.raises(ValueError, match="Brainstem falls in 0 classes"):
        atlas_data.aal_lookup(names)


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def test_a_deb_unpacks_in_python_without_dpkg(tmp_path, monkeypatch):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        content = b"1 Precentral_L 2001\n"
        member = tarfile.TarInfo("./usr/share/mricron/templates/aal.nii.txt")
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))
    deb = tmp_path / "mricron-data_1_all.deb"
    deb.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x")
                    + ar_member("data.tar.xz", lzma.compress(payload.getvalue())))
    monkeypatch.setattr(atlas_data.shutil, "which", lambda name: None)
    atlas_data.extract_deb(deb, tmp_path / "root")
    assert (tmp_path / "root" / atlas_data.TEMPLATES / "aal.nii.txt").read_bytes() == content


@pytest.mark.slow
def test_quick_check_segments_the_unseen_hemisphere_in_place(tmp_path):
    templates, why = atlas_data.locate_templates()
    if templates is None:
        pytest.skip(why)
    env = {"MEDFORMER_ATLAS_DIR": str(templates), "MEDFORMER_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "atlas_check.py"), "--quick", "--work",
                           str(tmp_path / "work"), "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "atlas_check_quick.json").read_text())
    assert {r["arm"] for r in report["runs"]} == {"pretrained", "scratch"}
    for run in report["runs"]:
        # The script checked the mask's shape and affine against the input; the Dice is in that grid.
        cortex = run["test"]["dice"]["cerebral cortex"]
        assert cortex > 0.6, run["test"]  # background everywhere: 0; the mask mirrored in x: about 0.5
        assert run["test"]["mean_dice"] > report["baselines"]["background everywhere"] + 0.15
        assert np.linalg.norm(run["test"]["centroid_offset_mm"]["cerebral cortex"]) < 15.0
        assert run["val"]["dice"]["cerebral cortex"] > 0.5, run["val"]  # the held-out slab of the left hemisphere
    table = (tmp_path / "results" / "atlas_check_quick.md").read_text()
    assert "| 100% | 106 | pretrained |" in table and "medformer predict" in table
    for part, name in (("test", "right"), ("val", "val")):
        mask = nib.load(tmp_path / "work" / "scratch-1-e4-seed0" / f"predict-{part}" / f"{name}.nii.gz")
        image = nib.load(tmp_path / "work" / "data" / part / "images" / f"{name}.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)


def test_the_val_slab_is_untouched_by_training_blocks():
    affine = np.eye(4)
    affine[:3, 3] = (-5.0, -60.0, 0.0)  # voxel j is at y = j - 60
    left = atlas_data.Part(np.zeros((5, 120, 6), np.uint8), np.ones((5, 120, 6), np.uint8), affine)
    val, rest = atlas_data.val_slab(left, (-46.0, 2.0))
    assert val.image.shape == (5, 48, 6) and val.affine[1, 3] == -46.0
    spans = []
    for part, j in rest:
        for name, block in atlas_data.labeled_blocks(part, 4, 2, to_end=True, offset=(0, j, 0)):
            y0 = block.affine[1, 3]
            assert int(name.split("_")[1]) == y0 + 60  # named by its place in the hemisphere
            assert y0 + 4 <= -46.0 or y0 >= 2.0, name  # no block reaches into the slab
            spans.append((y0, y0 + 4))
    assert min(a for a, _ in spans) == -60.0 and max(b for _, b in spans) == 60.0  # the rest is covered
