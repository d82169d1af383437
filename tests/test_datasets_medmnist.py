"""MedMNIST plugin: every set and size registered, layouts, labels by task, label fractions,
memory mapping, and one clear error per kind of bad file; also on the real shared files."""

import numpy as np
import pytest
import torch

from medformer_core.api.data import DatasetOptions
from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import DataError, UsageError
from medformer_core.api.plugins import registries
from medformer_core.engine.augment import Augment
from medformer_plugins.medmnist_files import Variant, all_variants, info_table, verify_file


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFORMER_CACHE_DIR", str(tmp_path / "cache"))


def build(name, root, split="train", **options):
    factory, opts = resolve_dataset(name, data_root=root, **options)
    return factory.build(split, opts)


def test_every_dataset_at_every_size_is_registered():
    names = set(registries().datasets.names())
    flags = list(info_table())
    assert len(flags) == 18
    for flag in flags:
        sizes = (28, 64) if flag.endswith("3d") else (28, 64, 128, 224)
        assert {Variant(flag, s).name for s in sizes} <= names
    assert {"retinamnist", "retinamnist_64", "retinamnist_128", "retinamnist_224", "adrenalmnist3d",
            "adrenalmnist3d_64"} <= names
    assert "adrenalmnist3d_128" not in names
    info = registries().datasets.get("chestmnist_224").info(DatasetOptions())
    assert (info.spatial_dims, info.channels, info.size, info.task) == (2, 1, (224, 224), "multi-label, binary-class")
    assert info.split_sizes == {"train": 78468, "val": 11219, "test": 22433}


@pytest.mark.parametrize("name", [v.name for v in all_variants()])
def test_every_registered_medmnist_dataset_builds_and_augments(tmp_path, name, fake_arrays):
    """timm-style: each of the 60 registered files, generated tiny, loads, batches and augments."""
    counts = {"train": 4, "val": 2, "test": 2}
    np.savez(tmp_path / f"{name}.npz", **fake_arrays(name, counts=counts))
    factory, options = resolve_dataset(name, data_root=tmp_path)
    info = factory.info(options)
    split = factory.build("train", options)
    batch = split.batch([0, 3])
    assert batch["image"].shape == (2, info.channels) + info.size
    assert batch["label"].shape[1] == (info.num_classes if info.task.startswith("multi-label") else 1)
    augmented = Augment(info.spatial_dims)(batch["image"], torch.Generator().manual_seed(0))
    assert augmented.shape == batch["image"].shape


@pytest.mark.parametrize("name, shape, columns", [
    ("retinamnist", (3, 28, 28), 1),       # colour [N, H, W, 3] -> [N, 3, H, W], ordinal
    ("chestmnist", (1, 28, 28), 14),       # multi-label: one 0/1 column per finding
    ("breastmnist_64", (1, 64, 64), 1),    # binary, 64 px
    ("adrenalmnist3d", (1, 28, 28, 28), 1),  # volume
])
@pytest.mark.parametrize("compressed", [True, False])
def test_layout_and_labels(tmp_path, name, shape, columns, compressed, fake_arrays, write_npz):
    write_npz(tmp_path, name, compressed=compressed)
    source = fake_arrays(name)
    split = build(name, tmp_path, "val")
    assert len(split) == 4 and split.images.shape[1:] == shape
    assert split.labels.dtype == np.int64 and split.labels.shape == (4, columns)
    np.testing.assert_array_equal(split.labels, source["val_labels"])
    batch = split.batch([2, 0])
    assert batch["image"].shape == (2,) + shape and batch["dataset"] == name
    first = source["val_images"][0]
    expected = np.moveaxis(first, -1, 0) if shape[0] == 3 else first[None]
    np.testing.assert_allclose(batch["image"][0].numpy(), expected / 255.0, atol=1e-6)
    assert batch["label"].shape == (2, columns)


def test_unlabeled_mode(tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist")
    split = build("retinamnist", tmp_path, labeled=False)
    assert split.labels is None and "label" not in split.batch([0, 1])


def test_label_fraction_is_stratified_and_seeded(tmp_path, fake_arrays):
    counts = {"train": 400, "val": 4, "test": 4}
    path = tmp_path / "breastmnist.npz"
    arrays = fake_arrays("breastmnist", counts=counts)
    labels = np.zeros((400, 1), np.uint8)
    labels[:100] = 1  # 25% positives
    np.savez(path, **{**arrays, "train_labels": labels})
    part = build("breastmnist", tmp_path, label_fraction=0.1, seed=1)
    assert len(part) == 40 and int(part.labels.sum()) == 10  # class balance kept
    assert np.array_equal(part.index, build("breastmnist", tmp_path, label_fraction=0.1, seed=1).index)
    assert not np.array_equal(part.index, build("breastmnist", tmp_path, label_fraction=0.1, seed=2).index)
    np.testing.assert_array_equal(part.labels[:, 0], labels[part.index, 0])
    np.testing.assert_allclose(part.batch([0])["image"][0, 0].numpy(), arrays["train_images"][part.index[0]] / 255.0,
                               atol=1e-6)
    assert len(build("breastmnist", tmp_path, "val", label_fraction=0.1)) == 4  # only train is thinned
    assert len(build("breastmnist", tmp_path, labeled=False, label_fraction=0.1)) == 400  # self-supervision sees all
    with pytest.raises(UsageError, match="label fraction must be in"):
        build("breastmnist", tmp_path, label_fraction=0.0)


def test_label_fraction_multi_label_keeps_rare_findings(tmp_path, write_npz):
    write_npz(tmp_path, "chestmnist", train_images=np.zeros((200, 28, 28), np.uint8),
              train_labels=(np.arange(200)[:, None] % np.arange(2, 16)[None, :] == 0).astype(np.uint8))
    part = build("chestmnist", tmp_path, label_fraction=0.2)
    assert 30 <= len(part) <= 50
    assert part.labels[:, 13].sum() >= 1  # the rarest finding survives


def test_memory_mapping(tmp_path, write_npz):
    write_npz(tmp_path, "adrenalmnist3d", compressed=False)
    stored = build("adrenalmnist3d", tmp_path)
    assert isinstance(stored.images.base, np.memmap) or isinstance(stored.images, np.memmap)
    write_npz(tmp_path / "c", "adrenalmnist3d", compressed=True)
    mapped = build("adrenalmnist3d", tmp_path / "c", extra={"mmap": "always"})
    assert isinstance(mapped.images.base, np.memmap) or isinstance(mapped.images, np.memmap)
    cached = list((tmp_path / "cache").rglob("train_images.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.asarray(mapped.images), np.asarray(stored.images))
    build("adrenalmnist3d", tmp_path / "c", extra={"mmap": "always"})  # reuses the extraction
    assert list((tmp_path / "cache").rglob("train_images.npy")) == cached
    write_npz(tmp_path / "c", "adrenalmnist3d", compressed=True)  # a replaced file is extracted again
    build("adrenalmnist3d", tmp_path / "c", extra={"mmap": "always"})
    assert len(list((tmp_path / "cache").rglob("train_images.npy"))) == 1
    in_memory = build("adrenalmnist3d", tmp_path, extra={"mmap": "never"})
    assert not isinstance(in_memory.images.base, np.memmap)
    with pytest.raises(UsageError, match="mmap must be one of"):
        build("adrenalmnist3d", tmp_path, extra={"mmap": "sometimes"})


def test_wrong_size_and_split_are_usage_errors(tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist")
    with pytest.raises(UsageError, match="'retinamnist' is 28 voxels a side, not 64.*use dataset 'retinamnist_64'"):
        build("retinamnist", tmp_path, size=64)
    with pytest.raises(UsageError, match="sizes 28, 64"):
        build("adrenalmnist3d", tmp_path, size=32)
    with pytest.raises(UsageError, match="no split 'dev'"):
        build("retinamnist", tmp_path, "dev")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_member(path):
    data = bytearray(path.read_bytes())
    for i in range(200, 400):
        data[i] ^= 0xFF  # inside the first member's compressed data
    path.write_bytes(bytes(data))


BAD_FILES = [  # (case, make(write_npz, root), message)
    ("truncated", lambda write, root: _truncate(write(root, "retinamnist")),
     r"retinamnist\.npz: not a readable \.npz archive"),
    ("corrupt member", lambda write, root: _corrupt_member(write(root, "retinamnist")),
     r"retinamnist\.npz: member train_images is unreadable"),
    ("missing keys", lambda write, root: write(root, "retinamnist", train_labels=None),
     r"retinamnist\.npz: missing key\(s\) train_labels"),
    ("wrong shape", lambda write, root: write(root, "retinamnist", train_images=np.zeros((12, 32, 32, 3), np.uint8)),
     r"retinamnist\.npz: train_images is uint8\[12, 32, 32, 3\], expected uint8\[N, 28, 28, 3\]"),
    ("wrong dtype", lambda write, root: write(root, "retinamnist", train_images=np.zeros((12, 28, 28, 3), np.float32)),
     r"train_images is float32\[12, 28, 28, 3\], expected uint8"),
    ("label shape", lambda write, root: write(root, "retinamnist", train_labels=np.zeros((11, 1), np.uint8)),
     r"train_labels is uint8\[11, 1\], expected integers \[12, 1\]"),
    ("label dtype", lambda write, root: write(root, "retinamnist", train_labels=np.zeros((12, 1), np.float32)),
     r"train_labels is float32"),
    ("label range", lambda write, root: write(root, "retinamnist", train_labels=np.full((12, 1), 5, np.uint8)),
     r"train_labels holds 5 at row 0; ordinal-regression labels must be in 0\.\.4"),
]


@pytest.mark.parametrize("case, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_give_one_clear_error(tmp_path, case, make, message, write_npz):
    make(write_npz, tmp_path)
    with pytest.raises(DataError, match=message) as info:
        build("retinamnist", tmp_path)
    assert "\n" not in str(info.value)


def test_multi_label_values_must_be_binary(tmp_path, write_npz):
    labels = np.zeros((12, 14), np.uint8)
    labels[3, 2] = 2
    write_npz(tmp_path, "chestmnist", train_labels=labels)
    message = r"chestmnist\.npz: train_labels holds 2 at row 3; multi-label, binary-class labels must be in 0\.\.1"
    with pytest.raises(DataError, match=message):
        build("chestmnist", tmp_path)


def test_missing_file_names_path_and_download_command(tmp_path):
    with pytest.raises(DataError) as info:
        build("retinamnist_64", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "retinamnist_64.npz") in message
    assert f"medformer datasets download retinamnist --size 64 --data-root {tmp_path}" in message


def test_md5_mismatch_and_its_override(tmp_path, write_npz):
    write_npz(tmp_path, "retinamnist")
    message = r"retinamnist\.npz: MD5 \w+ differs from bd4c0672f1bba3e3a89f0e4e876791e4.*--force"
    with pytest.raises(DataError, match=message):
        build("retinamnist", tmp_path, verify_md5=True)
    assert len(build("retinamnist", tmp_path, verify_md5=False)) == 12


# -- the real files -------------------------------------------------------------------------------


def test_real_retinamnist(real_root):
    split = build("retinamnist", real_root, verify_md5=True)
    assert split.images.shape == (1080, 3, 28, 28) and split.labels.shape == (1080, 1)
    assert set(np.unique(split.labels)) == {0, 1, 2, 3, 4}
    test = build("retinamnist", real_root, "test")
    assert len(test) == 400
    batch = split.batch(np.arange(0, 1080, 100))
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    part = build("retinamnist", real_root, label_fraction=0.1, seed=0)
    assert 100 <= len(part) <= 115 and set(np.unique(part.labels)) == {0, 1, 2, 3, 4}


def test_real_adrenal_volumes_memory_mapped(real_root):
    split = build("adrenalmnist3d", real_root, extra={"mmap": "always"})
    assert split.images.shape == (1188, 1, 28, 28, 28) and isinstance(split.images.base, np.memmap)
    assert set(np.unique(split.labels)) == {0, 1}
    volume = split.batch([0])["image"]
    assert volume.shape == (1, 1, 28, 28, 28) and 0 < float(volume.mean()) < 1


@pytest.mark.parametrize("name", ["retinamnist", "adrenalmnist3d", "adrenalmnist3d_64"])
def test_real_files_verify(name, real_root):
    flag, _, size = name.partition("_")
    sizes = verify_file(Variant(flag, int(size or 28)), real_root / f"{name}.npz")
    assert sizes == info_table()[flag]["n_samples"]

