"""`medformer datasets ...`: output and, for every bad input, the one-line message and exit code."""

import json
import urllib.error

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFORMER_MEDMNIST_MIRROR", raising=False)


@pytest.fixture
def offline(monkeypatch):
    def urlopen(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr("urllib.request.urlopen", urlopen)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_list_json_reports_presence(run_cli, tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist_64")
    code, out, _ = run_cli("datasets", "list", "--json", "--data-root", str(tmp_path))
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["retinamnist_64"]["present"] is True and rows["retinamnist"]["present"] is False
    retina = rows["retinamnist"]
    assert (retina["task"], retina["spatial_dims"], retina["channels"]) == ("ordinal-regression", [2], 3)
    assert retina["split_sizes"] == {"train": 1080, "val": 120, "test": 400}
    assert retina["sizes_offered"] == [28, 64, 128, 224] and rows["organmnist3d"]["sizes_offered"] == [28, 64]
    assert rows["retinamnist"]["path"] == str(tmp_path / "retinamnist.npz")
    assert "phantoms3d" in rows and "folder" in rows
    assert sum(1 for row in rows.values() if row.get("path")) == 60


def test_list_table(run_cli, tmp_path):
    code, out, _ = run_cli("datasets", "list", "--data-root", str(tmp_path))
    assert code == 0 and "bloodmnist" in out and "phantoms2d" in out and str(tmp_path) in out.replace("\n", "")


def test_info(run_cli, tmp_path):
    code, out, _ = run_cli("datasets", "info", "chestmnist_64", "--data-root", str(tmp_path))
    assert code == 0
    assert "multi-label, binary-class" in out and "13: hernia" in out and "train 78468" in out
    assert f"medformer datasets download chestmnist --size 64 --data-root {tmp_path}" in out


def test_info_unknown_name(run_cli):
    code, _, err = run_cli("datasets", "info", "retinamnst")
    assert code == 2 and "unknown dataset 'retinamnst'; did you mean 'retinamnist'" in one_line_error(err)


def test_download_offline(run_cli, tmp_path, offline):
    code, _, err = run_cli("datasets", "download", "retinamnist", "--size", "64", "--data-root", str(tmp_path))
    line = one_line_error(err)
    assert code == 1 and "cannot download https://zenodo.org/records/10519652/files/retinamnist_64.npz" in line
    assert list(tmp_path.iterdir()) == []


def test_download_md5_mismatch_and_override(run_cli, tmp_path, write_npz):
    mirror = tmp_path / "mirror"
    write_npz(mirror, "breastmnist")
    root = tmp_path / "root"
    code, _, err = run_cli("datasets", "download", "breastmnist", "--data-root", str(root), "--mirror", mirror.as_uri())
    assert code == 1 and "differs from" in one_line_error(err) and "--ignore-md5" in err
    assert not (root / "breastmnist.npz").exists()
    code, out, _ = run_cli("datasets", "download", "breastmnist", "--data-root", str(root), "--mirror", mirror.as_uri(),
                           "--ignore-md5")
    assert code == 0 and (root / "breastmnist.npz").read_bytes() == (mirror / "breastmnist.npz").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["adrenalmnist3d", "--size", "128"], "adrenalmnist3d has no size 128 (sizes offered: 28, 64)"),
    (["retinamnist_64", "--size", "28"], "'retinamnist_64' and --size 28 disagree"),
    (["retinamnst"], "unknown MedMNIST dataset 'retinamnst'; did you mean 'retinamnist'"),
    (["retinamnist_big"], "bad MedMNIST name 'retinamnist_big'"),
])
def test_download_bad_names(run_cli, tmp_path, args, message):
    code, _, err = run_cli("datasets", "download", *args, "--data-root", str(tmp_path))
    assert code == 2 and message in one_line_error(err)


def test_verify_layout_and_md5(run_cli, tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist")
    write_npz(tmp_path, "adrenalmnist3d_64", train_images=np.zeros((12, 64, 64, 64), np.uint8))
    code, out, _ = run_cli("datasets", "verify", "--no-md5", "--data-root", str(tmp_path))
    assert code == 0 and out.count("ok") == 2 and "layout (train 12, val 4, test 4)" in out
    code, _, err = run_cli("datasets", "verify", "retinamnist", "--data-root", str(tmp_path))
    assert code == 1 and "FAIL" in err and "MD5" in err and "1 of 1 file(s) failed verification" in err


def test_verify_reports_each_broken_file(run_cli, tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist", val_labels=np.full((4, 1), 9, np.uint8))
    write_npz(tmp_path, "bloodmnist")
    (tmp_path / "pathmnist.npz").write_bytes(b"PK\x03\x04 truncated")
    code, out, err = run_cli("datasets", "verify", "--no-md5", "--data-root", str(tmp_path))
    assert code == 1
    assert "retinamnist.npz: val_labels holds 9 at row 0" in err
    assert "pathmnist.npz: not a readable .npz archive" in err
    assert "bloodmnist.npz" in out and "2 of 3 file(s) failed verification" in err


def test_verify_missing(run_cli, tmp_path):
    code, _, err = run_cli("datasets", "verify", "--data-root", str(tmp_path))
    assert code == 1 and f"no MedMNIST files in {tmp_path}" in one_line_error(err)
    code, _, err = run_cli("datasets", "verify", "dermamnist_128", "--data-root", str(tmp_path))
    assert code == 1 and str(tmp_path / "dermamnist_128.npz") in err
    assert "medformer datasets download dermamnist --size 128" in err


def test_verify_real_files(run_cli, real_root):
    code, out, _ = run_cli("datasets", "verify", "--data-root", str(real_root))
    assert code == 0 and out.count("MD5 and layout") == len(list(real_root.glob("*.npz")))


@pytest.mark.parametrize("name, tile_rows", [("retinamnist", 1), ("adrenalmnist3d", 1), ("chestmnist", 1)])
def test_preview(run_cli, tmp_path, name, tile_rows, write_npz):
    write_npz(tmp_path, name)
    out_file = tmp_path / "out" / "preview.png"
    code, out, _ = run_cli("datasets", "preview", name, "--out", str(out_file), "--count", "4",
                           "--data-root", str(tmp_path))
    assert code == 0 and f"wrote {out_file}: 4 samples of {name}/train" in out
    picture = Image.open(out_file)
    width_per_sample = 3 if name.endswith("3d") else 1
    assert picture.width > 4 * width_per_sample * 100 and picture.height > 100
    assert np.asarray(picture).std() > 10  # not blank


def test_preview_real_volume(run_cli, tmp_path, real_root):
    out_file = tmp_path / "adrenal.png"
    code, out, _ = run_cli("datasets", "preview", "adrenalmnist3d", "--out", str(out_file),
                           "--data-root", str(real_root))
    assert code == 0 and ("normal" in out or "hyperplasia" in out) and out_file.stat().st_size > 1000


def test_preview_bad_output_and_missing_file(run_cli, tmp_path):
    code, _, err = run_cli("datasets", "preview", "retinamnist", "--out", str(tmp_path / "x.jpg"),
                           "--data-root", str(tmp_path))
    assert code == 2 and "--out must name a .png file" in one_line_error(err)
    code, _, err = run_cli("datasets", "preview", "retinamnist", "--out", str(tmp_path / "x.png"),
                           "--data-root", str(tmp_path))
    line = one_line_error(err)
    assert code == 1 and str(tmp_path / "retinamnist.npz") in line
    assert "medformer datasets download retinamnist --size 28" in line


BAD = [  # (case, damage(path, write_npz), message)
    ("truncated", lambda p, write: p.write_bytes(p.read_bytes()[:5000]),
     "retinamnist.npz: not a readable .npz archive"),
    ("missing keys", lambda p, write: np.savez(p, train_images=np.zeros((2, 28, 28, 3), np.uint8)),
     "retinamnist.npz: missing key(s) train_labels"),
    ("wrong shape", lambda p, write: write(p.parent, "retinamnist", train_images=np.zeros((12, 28, 28), np.uint8)),
     "retinamnist.npz: train_images is uint8[12, 28, 28], expected uint8[N, 28, 28, 3]"),
    ("wrong dtype", lambda p, write: write(p.parent, "retinamnist", train_labels=np.zeros((12, 1), np.float64)),
     "retinamnist.npz: train_labels is float64[12, 1], expected integers [12, 1]"),
    ("label range", lambda p, write: write(p.parent, "retinamnist", train_labels=np.full((12, 1), 7, np.int64)),
     "retinamnist.npz: train_labels holds 7 at row 0; ordinal-regression labels must be in 0..4"),
]


@pytest.mark.parametrize("case, damage, message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_through_the_cli(run_cli, tmp_path, case, damage, message, write_npz):
    damage(write_npz(tmp_path, "retinamnist"), write_npz)
    code, _, err = run_cli("datasets", "preview", "retinamnist", "--out", str(tmp_path / "p.png"),
                           "--data-root", str(tmp_path))
    assert code == 1 and message in one_line_error(err)
    assert not (tmp_path / "p.png").exists()


# -- the folder plugin through the CLI -----------------------------------------------------------------


def _pictures(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(folder / f"p{i}.png")


def test_folder_info_and_preview(run_cli, tmp_path):
    _pictures(tmp_path / "scans")
    code, out, _ = run_cli("datasets", "info", str(tmp_path / "scans"))
    assert code == 0 and "folder:scans" in out and "1 channel(s) x 128x128 (2D)" in out
    png = tmp_path / "p.png"
    code, out, _ = run_cli("datasets", "preview", f"folder:{tmp_path / 'scans'},size=32,val=0,test=0",
                           "--out", str(png))
    assert code == 0 and "3 samples of folder:scans/train (unlabeled" in out and png.is_file()


@pytest.mark.parametrize("make, ref, code_expected, message", [
    (lambda root: (root / "empty").mkdir(), "folder:{root}/empty", 1, "no images or volumes found in"),
    (lambda root: None, "{root}/nowhere", 1, "nowhere does not exist"),
    (lambda root: _pictures(root / "s"), "folder:{root}/s,fit=squash", 2, "fit must be one of pad, crop, stretch"),
    (lambda root: _pictures(root / "s"), "folder:{root}/s,labels=nope.csv", 2, "nope.csv not found"),
])
def test_folder_bad_input_through_the_cli(run_cli, tmp_path, make, ref, code_expected, message):
    make(tmp_path)
    code, _, err = run_cli("datasets", "preview", ref.format(root=tmp_path), "--out", str(tmp_path / "x.png"))
    assert code == code_expected and message in one_line_error(err)


def test_folder_missing_extra_through_the_cli(run_cli, tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.dcm").write_bytes(b"x")
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)
    code, _, err = run_cli("datasets", "info", str(tmp_path / "d"))
    assert code == 1 and "pydicom is not installed (pip install 'medformer[dicom]')" in one_line_error(err)


def test_download_all_continues_past_failures(run_cli, tmp_path, write_npz):
    mirror = tmp_path / "mirror"
    write_npz(mirror, "breastmnist_128")
    write_npz(mirror, "retinamnist_128")
    root = tmp_path / "root"
    code, out, err = run_cli("datasets", "download", "all", "--size", "128", "--ignore-md5",
                             "--mirror", mirror.as_uri(), "--data-root", str(root))
    assert code == 1 and "10 of 12 download(s) failed" in err  # only the 12 2D sets come in 128; 2 are mirrored
    assert sorted(p.name for p in root.iterdir()) == ["breastmnist_128.npz", "retinamnist_128.npz"]
    assert "FAIL pathmnist_128: cannot download file://" in err.replace("\n", "")
    assert "retinamnist_128: downloaded to" in out
