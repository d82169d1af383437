"""Folder plugin on the real NIfTI and DICOM files nibabel and pydicom ship, and on generated pictures:
reading, stacking, normalising, fitting, labels, splits, caching, and every bad-input case."""

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import DataError, MedformerError, UsageError
from medformer_core.api.plugins import registries
from medformer_plugins.folder import parse_settings
from medformer_plugins.folder_readers import find_samples, read_sample

nibabel = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from pydicom.uid import generate_uid  # noqa: E402

NIFTI = Path(nibabel.__file__).parent / "tests" / "data"
DICOM = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))


def build(ref, split="train", **options):
    factory, opts = resolve_dataset(ref, **options)
    return factory.build(split, opts)


def info(ref, **options):
    factory, opts = resolve_dataset(ref, **options)
    return factory.info(opts)


def copy(name, source, folder):
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source / name, folder / name))


def write_series(folder: Path, count=6, spacing=2.5, uid=None, shuffle=(3, 0, 4, 1, 2, 5)):
    """A CT series from CT_small.dcm: slice i holds raw value 1000 + 100 i (HU -24 + 100 i), written
    in shuffled file order, without file extension, with InstanceNumber reversed."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    for position, i in enumerate(shuffle[:count]):
        ds = pydicom.dcmread(DICOM / "CT_small.dcm")
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, -75.0 + spacing * i]
        ds.InstanceNumber = 100 - i
        pixels = np.full((ds.Rows, ds.Columns), 1000 + 100 * i, dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{position:04d}")
    return uid


# -- reading --------------------------------------------------------------------------------------


def test_dicom_series_is_stacked_by_position(tmp_path):
    write_series(tmp_path / "patient1" / "ct")
    samples, skipped = find_samples(tmp_path)
    assert skipped == [] and [s.key for s in samples] == ["patient1/ct"]
    assert samples[0].kind == "dicom-series" and samples[0].shape == (6, 128, 128)
    scan = read_sample(samples[0], tmp_path)
    assert scan.array.shape == (1, 6, 128, 128) and scan.modality == "CT"
    np.testing.assert_allclose(scan.array[0, :, 0, 0], -24 + 100 * np.arange(6))  # HU, in z order
    assert scan.spacing == pytest.approx((2.5, 0.661468, 0.661468))


def test_two_series_in_one_folder_are_two_samples(tmp_path):
    first = write_series(tmp_path / "mixed", count=3, shuffle=(0, 1, 2))
    second = write_series(tmp_path / "other", count=3, shuffle=(0, 1, 2))
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / "mixed" / f"B{path.name}")
    keys = sorted(s.key for s in find_samples(tmp_path)[0])
    assert keys == sorted([f"mixed#{first}", f"mixed#{second}"])


def test_multi_frame_dicom_is_a_volume(tmp_path):
    copy("rtdose.dcm", DICOM, tmp_path)
    (sample,), _ = find_samples(tmp_path)
    scan = read_sample(sample, tmp_path)
    assert sample.kind == "dicom" and scan.array.shape == (1, 15, 10, 10)
    offsets = [float(v) for v in pydicom.dcmread(DICOM / "rtdose.dcm").GridFrameOffsetVector]
    assert scan.spacing[0] == pytest.approx(np.median(np.diff(sorted(offsets))))


def test_nifti_axes_and_channels(tmp_path):
    copy("anatomical.nii", NIFTI, tmp_path)
    copy("example4d.nii.gz", NIFTI, tmp_path)
    samples = {s.key: s for s in find_samples(tmp_path)[0]}
    anatomical = read_sample(samples["anatomical.nii"], tmp_path)
    assert anatomical.array.shape == (1, 25, 41, 33) and samples["anatomical.nii"].shape == (25, 41, 33)
    four_d = read_sample(samples["example4d.nii.gz"], tmp_path)
    assert four_d.array.shape == (2, 24, 96, 128) and four_d.spacing == pytest.approx((2.2, 2.0, 2.0))


def test_real_nifti_through_the_dataset(tmp_path):
    copy("anatomical.nii", NIFTI, tmp_path / "mr")
    data = build(f"folder:{tmp_path / 'mr'},size=32,val=0,test=0")
    assert data.images.shape == (1, 1, 32, 32, 32) and data.images.dtype == np.uint8
    assert data.info.spatial_dims == 3 and data.info.task == "none" and data.labels is None
    volume = data.batch([0])["image"]
    assert float(volume.max()) > 0.9 and float(volume.min()) == 0.0  # percentile-clipped MR, area-resampled
    assert (volume[0, 0, :, :, 0] == 0).all()  # pad mode: 41x33 mm plane in a square keeps margins


def test_ct_window_in_hounsfield_units(tmp_path):
    copy("CT_small.dcm", DICOM, tmp_path)
    data = build(f"folder:{tmp_path},size=128,window=40:400,val=0,test=0")  # native size: no resampling
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round(np.clip((hu - (40 - 200)) / 400, 0, 1) * 255)
    assert data.info.spatial_dims == 2
    np.testing.assert_array_equal(data.images[0, 0], expected.astype(np.uint8))


@pytest.mark.parametrize("fit, depth", [("pad", 11), ("crop", 32), ("stretch", 32)])
def test_fit_modes_respect_physical_size(tmp_path, fit, depth):
    write_series(tmp_path / "s", count=6, spacing=5.0)  # 30 mm deep, 128 x 0.66 = 85 mm wide
    data = build(f"folder:{tmp_path},size=32,fit={fit},val=0,test=0")
    assert data.images.shape == (1, 1, 32, 32, 32)
    assert int((data.images[0, 0].max(axis=(1, 2)) > 0).sum()) == depth  # pad: 30 * 32 / 85 = 11 slices
    assert (data.images[0, 0, 16] > 0).all()  # in-plane the scan fills the square in every mode


def test_slices_from_volumes(tmp_path):
    write_series(tmp_path / "a")
    copy("anatomical.nii", NIFTI, tmp_path)
    details = info(f"folder:{tmp_path},slices=axial,size=16,val=0,test=0")
    assert details.spatial_dims == 2 and details.split_sizes["train"] == 6 + 25
    data = build(f"folder:{tmp_path},slices=axial,size=16,val=0,test=0")
    assert data.images.shape == (31, 1, 16, 16)
    coronal = build(f"folder:{tmp_path},slices=coronal,size=16,val=0,test=0")
    assert len(coronal) == 128 + 41


def test_pictures_grey_colour_16bit_and_tiff_stacks(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(tmp_path / "colour.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(tmp_path / "colour2.tif")
    Image.fromarray(rng.integers(0, 60000, (30, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    data = build(f"folder:{tmp_path},size=24,val=0,test=0")
    assert data.info.channels == 3 and data.images.shape == (4, 3, 24, 24)  # grey converted to RGB
    grey = build(f"folder:{tmp_path},size=24,channels=1,val=0,test=0")
    assert grey.images.shape == (4, 1, 24, 24)
    stack = tmp_path / "stack"
    stack.mkdir()
    pages = [Image.fromarray(np.full((20, 20), 40 * i, np.uint8)) for i in range(5)]
    pages[0].save(stack / "volume.tif", save_all=True, append_images=pages[1:])
    volume = build(f"folder:{stack},size=8,fit=stretch,val=0,test=0")
    assert volume.info.spatial_dims == 3 and volume.images.shape == (1, 1, 8, 8, 8)
    assert list(volume.images[0, 0, :, 4, 4]) == sorted(volume.images[0, 0, :, 4, 4])


# -- labels and splits ----------------------------------------------------------------------------


def _pictures(folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12), (20 * i) % 256, np.uint8)).save(folder / name)


def test_labels_csv_names_classes(tmp_path, caplog):
    _pictures(tmp_path, [f"img{i}.png" for i in range(6)])
    rows = ["path,label", "img0.png,normal", "./img1.png,tumour", "img2.png,normal", "img3.png,tumour",
            "img4.png,normal", "gone.png,normal"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ref = f"folder:{tmp_path},size=8,val=0,test=0"
    details = info(ref)
    assert details.task == "binary-class" and details.labels == {0: "normal", 1: "tumour"}
    assert details.split_sizes["train"] == 5
    with caplog.at_level(logging.WARNING, logger="medformer.data"):
        data = build(ref)
    assert data.labels[:, 0].tolist() == [0, 1, 0, 1, 0]
    assert data.batch([1])["label"].tolist() == [[1]]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "1 sample(s) without a row in the labels CSV" in text and "1 row(s) of the labels CSV name no sample" in text
    assert len(build(ref, labeled=False)) == 6  # self-supervision uses the unlabeled picture too


def test_label_fraction_on_a_folder(tmp_path):
    _pictures(tmp_path, [f"img{i:02d}.png" for i in range(40)])
    (tmp_path / "y.csv").write_text("path,label\n" + "".join(f"img{i:02d}.png,{i % 4}\n" for i in range(40)))
    data = build(f"folder:{tmp_path},size=8,labels=y.csv,val=0,test=0", label_fraction=0.3, seed=3)
    assert len(data) == 12 and np.bincount(data.labels[:, 0]).tolist() == [3, 3, 3, 3]


def test_split_folders_and_csv_split_column(tmp_path):
    _pictures(tmp_path / "a", ["train/x1.png", "train/x2.png", "validation/x3.png", "test/x4.png", "stray.png"])
    sizes = info(f"folder:{tmp_path / 'a'},size=8").split_sizes
    assert sizes == {"train": 2, "val": 1, "test": 1}  # stray.png is outside the split folders
    _pictures(tmp_path / "b", ["p1.png", "p2.png", "p3.png"])
    (tmp_path / "b" / "labels.csv").write_text("path,label,split\np1.png,0,train\np2.png,1,test\np3.png,1,train\n")
    assert info(f"folder:{tmp_path / 'b'},size=8").split_sizes == {"train": 2, "val": 0, "test": 1}
    assert build(f"folder:{tmp_path / 'b'},size=8", "test").labels.tolist() == [[1]]


def test_hashed_split_is_stable_when_files_are_added(tmp_path):
    _pictures(tmp_path, [f"img{i:03d}.png" for i in range(60)])
    folder = registries().datasets.get("folder")
    argument = f"{tmp_path},size=8,val=0.2,test=0.2"
    before = folder._scan(parse_settings(argument, {})).split
    counts = {k: list(before.values()).count(k) for k in ("train", "val", "test")}
    assert min(counts.values()) >= 5 and counts["train"] > counts["val"]
    _pictures(tmp_path / "more", ["new1.png", "new2.png"])
    after = folder._scan(parse_settings(argument, {})).split
    assert len(after) == 62 and {k: after[k] for k in before} == before


# -- caching ----------------------------------------------------------------------------------------


def test_processed_split_is_cached_and_refreshed(tmp_path):
    _pictures(tmp_path / "p", ["a.png", "b.png"])
    ref = f"folder:{tmp_path / 'p'},size=8,val=0,test=0"
    first = build(ref)
    assert not isinstance(first.images, np.memmap)
    again = build(ref)
    assert isinstance(again.images, np.memmap) and np.array_equal(np.asarray(again.images), first.images)
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(tmp_path / "p" / "a.png")
    os.utime(tmp_path / "p" / "a.png", ns=(1, 1))
    changed = build(ref)
    assert not isinstance(changed.images, np.memmap) and changed.images.max() == 255


# -- bad input ----------------------------------------------------------------------------------------


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, caplog):
    _pictures(tmp_path, ["good1.png", "sub/good2.png"])
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    copy("MR_truncated.dcm", DICOM, tmp_path)  # header fine, pixel data cut short
    png = (tmp_path / "good1.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "movie.mp4").write_bytes(b"\0" * 10)
    (tmp_path / "notes.txt").write_text("sidecars are ignored silently")
    with caplog.at_level(logging.WARNING, logger="medformer.data"):
        data = build(f"folder:{tmp_path},size=8,val=0,test=0,channels=1")
    assert len(data) == 2
    records = [r for r in caplog.records if r.name == "medformer.data"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "skipped 4 file(s)" in message
    for name in ("junk.dcm (not a readable DICOM image", "MR_truncated.dcm", "cut.png",
                 "movie.mp4 (unsupported file type)"):
        assert name in message
    assert "notes.txt" not in message


def test_empty_or_unreadable_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images or volumes found in .*empty \(supported: .nii"):
        build(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"garbage")
    (tmp_path / "junk" / "b.xyz").write_bytes(b"garbage")
    message = (r"no images or volumes found in .*junk; 2 file\(s\) skipped: a.dcm \(not a readable DICOM image"
               r".*b.xyz \(unsupported file type\)")
    with pytest.raises(DataError, match=message):
        build(f"folder:{tmp_path / 'junk'}")
    copy("MR_truncated.dcm", DICOM, tmp_path / "broken")
    with pytest.raises(DataError, match=r"broken: none of the 1 train sample\(s\) could be read"):
        build(f"folder:{tmp_path / 'broken'},val=0,test=0")


def test_missing_or_wrong_paths(tmp_path):
    with pytest.raises(DataError, match=r"folder .*nowhere does not exist"):
        build(str(tmp_path / "nowhere"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"file.png is not a directory"):
        build(f"folder:{tmp_path / 'file.png'}")
    with pytest.raises(UsageError, match="the folder dataset needs a directory"):
        build("folder")


@pytest.mark.parametrize("module, extra, make", [
    ("nibabel", "nifti", lambda d: copy("anatomical.nii", NIFTI, d)),
    ("pydicom", "dicom", lambda d: copy("CT_small.dcm", DICOM, d)),
])
def test_missing_optional_reader_names_the_extra(tmp_path, monkeypatch, module, extra, make):
    make(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    message = rf"holds 1 .* file\(s\), but {module} is not installed \(pip install 'medformer\[{extra}\]'\)"
    with pytest.raises(MedformerError, match=message):
        build(f"folder:{tmp_path}")


@pytest.mark.parametrize("setting, message", [
    ("fit=squash", "fit must be one of pad, crop, stretch, got 'squash'"),
    ("window=400", "window must be A:B, each a number, got '400'"),
    ("window=40:0", "window width must be > 0"),
    ("percentiles=99:1", "percentiles must satisfy"),
    ("size=2", "size must be >= 4"),
    ("val=0.6,test=0.5", "val + test must be in [0, 1)"),
    ("channels=many", "channels must be auto or an integer, got 'many'"),
    ("slices=oblique", "slices must be one of none, axial, coronal, sagittal"),
])
def test_bad_settings(tmp_path, setting, message):
    _pictures(tmp_path, ["a.png"])
    with pytest.raises(UsageError, match="folder dataset: bad setting") as info_:
        build(f"folder:{tmp_path},{setting}")
    assert message in str(info_.value)


def test_unknown_setting_and_bad_labels_files(tmp_path):
    _pictures(tmp_path, ["a.png"])
    with pytest.raises(UsageError, match="unknown setting 'colour'"):
        build(f"folder:{tmp_path},colour=1")
    with pytest.raises(UsageError, match=r"labels file .*missing.csv not found"):
        build(f"folder:{tmp_path},labels=missing.csv")
    (tmp_path / "one.csv").write_text("path\na.png\n")
    with pytest.raises(DataError, match=r"one.csv: expected columns path,label\[,split\] or path,mask, found path"):
        build(f"folder:{tmp_path},labels=one.csv")
    (tmp_path / "split.csv").write_text("path,label,split\na.png,1,holdout\n")
    with pytest.raises(DataError, match=r"split.csv: split 'holdout' for a.png; use train, val or test"):
        build(f"folder:{tmp_path},labels=split.csv")


def test_settings_from_options_extra(tmp_path):
    _pictures(tmp_path, ["a.png", "b.png"])
    data = build(str(tmp_path), extra={"size": 10, "val": 0, "test": 0, "mmap": "never"})
    assert data.images.shape == (2, 1, 10, 10)
    data = build(f"{tmp_path},size=6", extra={"size": 10, "val": 0, "test": 0})
    assert data.images.shape == (2, 1, 6, 6)  # the argument wins


def test_a_named_pipe_in_the_folder_is_skipped_not_read(tmp_path):
    _pictures(tmp_path, ["good1.png", "good2.png"])
    os.mkfifo(tmp_path / "pipe")  # no extension: a DICOM candidate, whose preamble read would block forever
    found: list = []
    worker = threading.Thread(target=lambda: found.append(find_samples(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert found, "scanning the folder hung on the named pipe"
    samples, skipped = found[0]
    assert len(samples) == 2 and skipped == [("pipe", "not a regular file (a pipe, socket, device or broken link)")]


def test_a_link_to_a_file_outside_the_folder_is_read_only_when_asked(tmp_path):
    _pictures(tmp_path / "data", ["inside.png"])
    _pictures(tmp_path / "elsewhere", ["a.png", "secret.png"])
    (tmp_path / "data" / "outside.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "again.png").symlink_to(tmp_path / "data" / "inside.png")  # inside: fine
    samples, skipped = find_samples(tmp_path / "data")
    assert sorted(s.key for s in samples) == ["inside.png", "sub/again.png"]
    assert skipped[0][0] == "outside.png" and "follow_links=true" in skipped[0][1]
    samples, skipped = find_samples(tmp_path / "data", follow_links=True)
    assert len(samples) == 3 and not skipped
    assert len(build(f"folder:{tmp_path / 'data'},size=8,val=0,test=0,follow_links=true")) == 3


def test_nan_voxels_are_counted_and_the_rest_of_the_scan_kept(tmp_path, caplog):
    volume = np.linspace(0, 300, 8 ** 3, dtype=np.float32).reshape(8, 8, 8)
    volume[:, :, 2] = np.nan  # a whole slice
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medformer.data"):
        data = build(f"folder:{tmp_path},size=8,val=0,test=0,intensity=mr")
    assert any("scan.nii.gz: 64 NaN or infinite voxel(s)" in r.getMessage() for r in caplog.records)
    image = data.batch([0])["image"]
    assert image.max() > 0.5 and np.isfinite(image.numpy()).all()
