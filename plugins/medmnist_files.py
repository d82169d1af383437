"""MedMNIST files: names, metadata, reading an official `.npz` (memory-mapped when large), checking it.

Memory mapping: `np.load(mmap_mode=...)` ignores `.npz` archives, so each member is handled by how
it is stored. A member stored uncompressed is mapped in place (its data offset is read from the zip
local header and the `.npy` header). The official files are deflate-compressed, so a large
compressed member (the images, above `MMAP_THRESHOLD` bytes, or always with `mmap="always"`) is
extracted once into the user cache (`$MEDFORMER_CACHE_DIR`, default `~/.cache/medformer`) as a
`.npy` and mapped from there; the cache key holds the archive's path, size and mtime, so a
replaced archive is extracted again. Small members are read into memory.
"""

import hashlib
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medformer_core import DataError, MedformerError, UsageError, atomic_write

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))
MMAP_THRESHOLD = 256 * 2**20
CACHE_ENV = "MEDFORMER_CACHE_DIR"
MMAP_MODES = ("auto", "always", "never")
# The datasets and sizes of medmnist 3.0.2, known without the package so that a name used without it
# says how to install it (tests check them against medmnist.INFO).
FLAGS = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
         "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist", "organmnist3d", "nodulemnist3d",
         "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d", "synapsemnist3d")
SIZES = {2: (28, 64, 128, 224), 3: (28, 64)}
INSTALL = "pip install --no-deps medmnist==3.0.2"


def info_table(user: str = "MedMNIST") -> dict:
    """`medmnist.INFO` (the medmnist package is installed without torchvision; only metadata is used).
    Without the package, a MedformerError says that `user` needs it and how to install it."""
    try:
        from medmnist.info import INFO
    except ImportError:
        raise MedformerError(f"{user} needs the medmnist package, which is not installed",
                             hint=f"install it with `{INSTALL}`; --no-deps keeps its torchvision dependency "
                                  "from installing a second torch") from None
    return INFO


@dataclass(frozen=True)
class Variant:
    """One MedMNIST file: dataset `flag` (e.g. retinamnist) at spatial `size`."""

    flag: str
    size: int

    @property
    def name(self) -> str:
        """Registered name and file stem, as the official files: retinamnist, retinamnist_64, ..."""
        return self.flag if self.size == 28 else f"{self.flag}_{self.size}"

    @property
    def file_name(self) -> str:
        return f"{self.name}.npz"

    @property
    def meta(self) -> dict:
        return info_table(f"dataset '{self.name}'")[self.flag]

    @property
    def spatial_dims(self) -> int:
        return 3 if self.flag.endswith("3d") else 2

    @property
    def url(self) -> str:
        return self.meta["url" if self.size == 28 else f"url_{self.size}"]

    @property
    def md5(self) -> str:
        return self.meta["MD5" if self.size == 28 else f"MD5_{self.size}"]

    def download_command(self, data_root: Path) -> str:
        return f"medformer datasets download {self.flag} --size {self.size} --data-root {data_root}"


def sizes_offered(flag: str) -> tuple[int, ...]:
    """The sizes `medmnist.INFO` lists a file for: (28, 64, 128, 224) in 2D, (28, 64) in 3D."""
    return SIZES[Variant(flag, 28).spatial_dims]


def all_variants() -> list[Variant]:
    return [Variant(flag, size) for flag in FLAGS for size in sizes_offered(flag)]


def locate(variant: Variant, data_root: Path) -> Path:
    """The archive's path; a missing file names the expected path and the download command."""
    path = Path(data_root) / variant.file_name
    if not path.is_file():
        raise DataError(f"{variant.name}: file {path} not found",
                        hint=f"download it with `{variant.download_command(data_root)}`")
    return path


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(variant: Variant, path: Path) -> None:
    actual = file_md5(path)
    if actual != variant.md5:
        raise DataError(
            f"{path}: MD5 {actual} differs from {variant.md5} (medmnist.INFO); the file is damaged or another version",
            hint=f"download it again with `{variant.download_command(path.parent)} --force`, "
                 "or load it anyway by turning MD5 checking off (DatasetOptions.verify_md5=False)",
        )


class NpzFile:
    """An opened `.npz`: member headers checked up front, arrays read on demand."""

    def __init__(self, path: Path, mmap: str = "auto"):
        if mmap not in MMAP_MODES:
            raise UsageError(f"mmap must be one of {', '.join(MMAP_MODES)}, got '{mmap}'")
        self.path, self.mmap = Path(path), mmap
        try:
            self.zip = zipfile.ZipFile(self.path)
            self.members = {Path(i.filename).stem: i for i in self.zip.infolist() if i.filename.endswith(".npy")}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{self.path}: not a readable .npz archive (truncated or corrupt: {exc})",
                            hint="download it again with --force") from None

    def close(self) -> None:
        self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def require(self, keys) -> None:
        missing = [key for key in keys if key not in self.members]
        if missing:
            raise DataError(f"{self.path}: missing key(s) {', '.join(missing)}; "
                            f"found {', '.join(sorted(self.members)) or 'none'}",
                            hint="a MedMNIST file holds train/val/test _images and _labels")

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of member `key` from its `.npy` header, without reading its data."""
        with self._guard(key):
            with self.zip.open(self.members[key]) as f:
                shape, _, dtype, _ = _read_npy_header(f)
        return shape, dtype

    def array(self, key: str) -> np.ndarray:
        """Member `key`: memory-mapped in place, from the extraction cache, or read into memory."""
        info = self.members[key]
        large = info.file_size >= MMAP_THRESHOLD if self.mmap == "auto" else self.mmap == "always"
        with self._guard(key):
            if info.compress_type == zipfile.ZIP_STORED and self.mmap != "never":
                return self._map_stored(info)
            if large:
                return np.load(self._extract(key), mmap_mode="r")
            with self.zip.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)

    def _guard(self, key: str):
        return _ReadErrors(f"{self.path}: member {key} is unreadable (truncated or corrupt")

    def _map_stored(self, info: zipfile.ZipInfo) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"{self.path}: bad zip local header for {info.filename}")
            name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_length + extra_length)
            start = f.tell()
            shape, fortran, dtype, header_length = _read_npy_header(f)
        if start + header_length + dtype.itemsize * int(np.prod(shape)) > self.path.stat().st_size:
            raise DataError(f"{self.path}: member {info.filename} is truncated")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=start + header_length, shape=shape,
                         order="F" if fortran else "C")

    def _extract(self, key: str) -> Path:
        """Extract member `key` once into the cache as a `.npy`; returns its path."""
        stat = self.path.stat()
        tag = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:10]
        folder = cache_dir() / "npz" / f"{self.path.stem}-{tag}-{stat.st_size}-{stat.st_mtime_ns}"
        target = folder / f"{key}.npy"
        if target.is_file() and target.stat().st_size == self.members[key].file_size:
            return target
        for stale in folder.parent.glob(f"{self.path.stem}-{tag}-*"):
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
        with atomic_write(target) as temp, open(temp, "wb") as out, self.zip.open(self.members[key]) as member:
            shutil.copyfileobj(member, out, length=2**22)
        return target


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/medformer").expanduser()


class _ReadErrors:
    """Turns the many ways a damaged zip member fails into one DataError naming the file."""

    def __init__(self, message: str):
        self.message = message

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)):
            raise DataError(f"{self.message}: {exc})", hint="download it again with --force") from None
        return False


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header length in bytes) of the `.npy` stream at `f`."""
    start = f.tell()
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, fortran, dtype, f.tell() - start


def sample_shape(variant: Variant) -> tuple[int, ...]:
    """One image in the file's layout: (S, S) gray, (S, S, 3) colour, (S, S, S) volume."""
    channels = variant.meta["n_channels"]
    return (variant.size,) * variant.spatial_dims + ((channels,) if channels > 1 else ())


def check_headers(variant: Variant, npz: NpzFile, split: str) -> int:
    """Check the shapes and dtypes of `split`'s images and labels; returns its sample count."""
    npz.require((f"{split}_images", f"{split}_labels"))
    shape, dtype = npz.header(f"{split}_images")
    expected = sample_shape(variant)
    if dtype != np.uint8 or len(shape) != 1 + len(expected) or tuple(shape[1:]) != expected:
        raise DataError(f"{npz.path}: {split}_images is {dtype}{list(shape)}, "
                        f"expected uint8[N, {', '.join(map(str, expected))}]",
                        hint=f"is this {variant.file_name} at size {variant.size}?")
    label_shape, label_dtype = npz.header(f"{split}_labels")
    columns = label_columns(variant)
    if label_dtype.kind not in "iub" or tuple(label_shape) != (shape[0], columns):
        raise DataError(f"{npz.path}: {split}_labels is {label_dtype}{list(label_shape)}, "
                        f"expected integers [{shape[0]}, {columns}]")
    return int(shape[0])


def label_columns(variant: Variant) -> int:
    """Columns of a label row: one per class for multi-label tasks, else one class index."""
    return len(variant.meta["label"]) if variant.meta["task"].startswith("multi-label") else 1


def read_labels(variant: Variant, npz: NpzFile, split: str) -> np.ndarray:
    """`split`'s labels as int64 [N, L], checked against the task's range."""
    labels = np.asarray(npz.array(f"{split}_labels")).astype(np.int64)
    high = 2 if label_columns(variant) > 1 else len(variant.meta["label"])
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{npz.path}: {split}_labels holds {int(labels[bad][0])} at row {row}; "
                        f"{variant.meta['task']} labels must be in 0..{high - 1}")
    return labels


def read_images(variant: Variant, npz: NpzFile, split: str) -> np.ndarray:
    """`split`'s images as [N, C, *S] uint8: a view of the file's array (no copy)."""
    images = npz.array(f"{split}_images")
    if images.ndim == 1 + variant.spatial_dims:
        return images[:, None]  # [N, *S] -> [N, 1, *S]
    return np.moveaxis(images, -1, 1)  # [N, H, W, C] -> [N, C, H, W]


def verify_file(variant: Variant, path: Path, md5: bool = True) -> dict[str, int]:
    """Check MD5 (optional) and the schema of every split, reading the labels; returns split sizes."""
    if md5:
        check_md5(variant, path)
    with NpzFile(path, mmap="never") as npz:
        npz.require(KEYS)
        sizes = {split: check_headers(variant, npz, split) for split in SPLITS}
        for split in SPLITS:
            read_labels(variant, npz, split)
    return sizes
