"""Find the samples in a directory tree and read each one to native intensities [C, *S] float32.

A sample is a NIfTI file (`.nii`, `.nii.gz`; 4D: the last axis is channels), a DICOM series (the
single-frame files sharing a SeriesInstanceUID, stacked in the order of their ImagePositionPatient
along the slice normal), a multi-frame DICOM file, or a PNG/JPEG/TIFF/BMP image (a multi-page TIFF
is a volume). Volumes come out as [C, D, H, W] with D the slice axis; images as [C, H, W].
nibabel and pydicom are optional: they are imported only when such files are present.
"""

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medformer_core import MedformerError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")
SIDECAR_SUFFIXES = {".csv", ".tsv", ".json", ".txt", ".md", ".bval", ".bvec", ".pdf", ".xml"}


@dataclass
class Sample:
    """One image or volume in the folder, before reading. `key` is its path relative to the root
    (for a DICOM series: the folder holding it, plus `#UID` when that folder holds several)."""

    key: str
    kind: str  # "nifti", "dicom-series", "dicom", "image"
    paths: list[Path]
    shape: tuple[int, ...] = ()  # spatial shape from the header: (H, W) or (D, H, W)
    channels: int = 1
    headers: list = field(default_factory=list, repr=False)  # DICOM datasets without pixels


@dataclass
class Scan:
    """A read sample: `array` [C, *S] float32 in native units (HU for CT), voxel `spacing` per axis
    in mm (1.0 where unknown), `modality` ("CT", "MR", ... or "" when the file does not say), and
    whether it came from an 8-bit picture (then intensities are already 0..255)."""

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str = ""
    eight_bit: bool = False


def missing_extra(module: str, extra: str, what: str, count: int, root: Path) -> MedformerError:
    return MedformerError(f"{root} holds {count} {what} file(s), but {module} is not installed",
                          hint=f"pip install 'medformer[{extra}]'")


def _import(module: str, extra: str, what: str, count: int, root: Path):
    try:
        return __import__(module)
    except ImportError:
        raise missing_extra(module, extra, what, count, root) from None


def find_samples(root: Path, ignore: set[Path] = frozenset(),
                 follow_links: bool = False) -> tuple[list[Sample], list[tuple[str, str]]]:
    """All samples under `root` (sorted by key) and the files skipped, as (relative path, reason).

    Hidden files and common sidecars (.csv, .json, ...) are ignored silently; `ignore` lists more.
    Only regular files are read (a named pipe or device would block or never end), and a link to a
    file outside `root` only with `follow_links`.
    """
    nifti, images, dicom_files, skipped = [], [], [], []
    inside = root.resolve()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            suffix = path.suffix.lower()
            if name.startswith(".") or path in ignore or suffix in SIDECAR_SUFFIXES:
                continue
            if not path.is_file():
                skipped.append((_rel(path, root), "not a regular file (a pipe, socket, device or broken link)"))
                continue
            if path.is_symlink() and not follow_links and inside not in path.resolve().parents:
                skipped.append((_rel(path, root), f"a link to {path.resolve()}, outside the folder "
                                                  "(pass follow_links=true to read it)"))
                continue
            if name.lower().endswith((".nii", ".nii.gz")):
                nifti.append(path)
            elif suffix in IMAGE_SUFFIXES:
                images.append(path)
            elif suffix in DICOM_SUFFIXES or (suffix == "" and _has_dicom_preamble(path)):
                dicom_files.append(path)
            else:
                skipped.append((_rel(path, root), "unsupported file type"))
    samples = [Sample(_rel(p, root), "nifti", [p]) for p in nifti]
    samples += [Sample(_rel(p, root), "image", [p]) for p in images]
    if dicom_files:
        series, bad = _group_dicom(dicom_files, root)
        samples += series
        skipped += bad
    probed = []
    for sample in samples:
        try:
            _probe(sample, root)
            probed.append(sample)
        except MedformerError:
            raise
        except Exception as exc:  # any reader error: the file is unreadable
            skipped.append((sample.key, describe_error(exc)))
    return sorted(probed, key=lambda s: s.key), sorted(skipped)


def read_sample(sample: Sample, root: Path) -> Scan:
    """Read one sample's pixels (raises on an unreadable file; the caller skips it)."""
    if sample.kind == "nifti":
        return _read_nifti(sample.paths[0], root)
    if sample.kind == "image":
        return _read_image(sample.paths[0])
    return _read_dicom(sample, root)


# -- probing: shapes and channels from headers ----------------------------------------------------


def _probe(sample: Sample, root: Path) -> None:
    if sample.kind == "nifti":
        nib = _import("nibabel", "nifti", "NIfTI", 1, root)
        shape = nib.load(sample.paths[0]).shape
        if len(shape) not in (2, 3, 4) or (len(shape) == 4 and shape[3] > 16):
            raise ValueError(f"unsupported NIfTI shape {shape}")
        spatial = tuple(shape[:3]) if len(shape) >= 3 else tuple(shape) + (1,)
        sample.channels = shape[3] if len(shape) == 4 else 1
        sample.shape = spatial[::-1] if spatial[2] > 1 else spatial[:2][::-1]  # (X, Y, Z) -> (D, H, W)
    elif sample.kind == "image":
        from PIL import Image

        with Image.open(sample.paths[0]) as image:
            frames = getattr(image, "n_frames", 1)
            sample.channels = image_channels(image.mode)
            sample.shape = ((frames,) if frames > 1 else ()) + (image.height, image.width)
    else:
        first = sample.headers[0]
        frames = int(first.get("NumberOfFrames", 1) or 1)
        depth = len(sample.headers) if sample.kind == "dicom-series" else frames
        sample.channels = int(first.get("SamplesPerPixel", 1))
        sample.shape = ((depth,) if depth > 1 else ()) + (int(first.Rows), int(first.Columns))


# -- NIfTI ----------------------------------------------------------------------------------------


def _read_nifti(path: Path, root: Path) -> Scan:
    nib = _import("nibabel", "nifti", "NIfTI", 1, root)
    image = nib.as_closest_canonical(nib.load(path))  # RAS+ axes, whatever the file's orientation
    data = np.asarray(image.get_fdata(dtype=np.float32))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if data.ndim == 2:
        data = data[:, :, None]
    data = data if data.ndim == 4 else data[..., None]  # [X, Y, Z, C]
    array = np.ascontiguousarray(data.transpose(3, 2, 1, 0)[:, :, ::-1])  # [C, Z, Y, X], anterior up
    spacing = (zooms + (1.0,) * 3)[:3][::-1]
    if array.shape[1] == 1:  # a single slice is an image
        return Scan(array[:, 0], spacing[1:])
    return Scan(array, spacing)


# -- images ---------------------------------------------------------------------------------------


def _read_image(path: Path) -> Scan:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        frames = [_pixels(frame) for frame in ImageSequence.Iterator(image)]
    eight_bit = all(f.dtype == np.uint8 for f in frames)
    stack = np.stack([f.astype(np.float32) for f in frames])  # [F, C, H, W]
    if len(frames) == 1:
        return Scan(stack[0], (1.0, 1.0), eight_bit=eight_bit)
    return Scan(np.ascontiguousarray(stack.transpose(1, 0, 2, 3)), (1.0, 1.0, 1.0), eight_bit=eight_bit)


def _pixels(frame) -> np.ndarray:
    """A PIL frame as [C, H, W]: 1 channel for grey levels, 3 for colour (alpha dropped)."""
    if image_channels(frame.mode) == 1:
        frame = frame if frame.mode in GREY_MODES else frame.convert("L")
    elif frame.mode != "RGB":
        frame = frame.convert("RGB")  # palette, RGBA, CMYK, YCbCr
    array = np.asarray(frame)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_channels(mode: str) -> int:
    """Channels a PIL mode becomes: 1 for grey levels (any bit depth), else 3."""
    return 1 if mode in GREY_MODES or mode in ("1", "LA", "La") else 3


# -- DICOM ----------------------------------------------------------------------------------------


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _group_dicom(paths: list[Path], root: Path) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Read headers; multi-frame files are samples of their own, other files group by series."""
    pydicom = _import("pydicom", "dicom", "DICOM", len(paths), root)
    series: dict[str, list] = defaultdict(list)
    samples, skipped = [], []
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if "Rows" not in header or "Columns" not in header:
                raise ValueError("no image in this file")
        except Exception as exc:
            skipped.append((_rel(path, root), f"not a readable DICOM image ({describe_error(exc)})"))
            continue
        header.filename = str(path)
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            samples.append(Sample(_rel(path, root), "dicom", [path], headers=[header]))
        else:
            series[str(header.get("SeriesInstanceUID", path))].append(header)
    folders = defaultdict(set)
    for uid, headers in series.items():
        folders[Path(headers[0].filename).parent].add(uid)
    for uid, headers in series.items():
        headers = _sort_slices(headers)
        if len(headers) == 1:
            samples.append(Sample(_rel(Path(headers[0].filename), root), "dicom", [Path(headers[0].filename)],
                                  headers=headers))
            continue
        folder = Path(headers[0].filename).parent
        key = _rel(folder, root) + (f"#{uid}" if len(folders[folder]) > 1 else "")
        samples.append(Sample(key, "dicom-series", [Path(h.filename) for h in headers], headers=headers))
    return samples, skipped


def _slice_normal(header) -> np.ndarray | None:
    orientation = header.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.array(orientation[:3], float), np.array(orientation[3:], float)
    return np.cross(row, column)


def _sort_slices(headers: list) -> list:
    """Order slices along the slice normal by ImagePositionPatient; else by InstanceNumber."""
    normal = _slice_normal(headers[0])
    if normal is not None and all(h.get("ImagePositionPatient") is not None for h in headers):
        return sorted(headers, key=lambda h: float(np.dot(np.array(h.ImagePositionPatient, float), normal)))
    return sorted(headers, key=lambda h: (int(h.get("InstanceNumber", 0) or 0), h.filename))


def _slice_spacing(headers: list) -> float:
    normal = _slice_normal(headers[0])
    if normal is not None and len(headers) > 1 and all(h.get("ImagePositionPatient") is not None for h in headers):
        positions = [float(np.dot(np.array(h.ImagePositionPatient, float), normal)) for h in headers]
        gaps = np.diff(positions)
        if len(gaps) and np.median(gaps) > 0:
            return float(np.median(gaps))
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        if headers[0].get(tag):
            return float(headers[0].get(tag))
    return 1.0


def _pixel_spacing(header) -> tuple[float, float]:
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    if spacing is None and "SharedFunctionalGroupsSequence" in header:
        shared = header.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in shared:
            spacing = shared.PixelMeasuresSequence[0].get("PixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)


def _modality_lut():
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut


def _dicom_pixels(dataset) -> np.ndarray:
    """Rescaled pixels of one file: [F, C, H, W] float32 (F = 1 for a single frame)."""
    pixels = _modality_lut()(dataset.pixel_array, dataset).astype(np.float32)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    channels = int(dataset.get("SamplesPerPixel", 1))
    if frames == 1:
        pixels = pixels[None]
    pixels = pixels[..., None] if channels == 1 else pixels  # [F, H, W, C]
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows low values bright
    return pixels.transpose(0, 3, 1, 2)


def _read_dicom(sample: Sample, root: Path) -> Scan:
    pydicom = _import("pydicom", "dicom", "DICOM", len(sample.paths), root)
    modality = str(sample.headers[0].get("Modality", ""))
    row, column = _pixel_spacing(sample.headers[0])
    if sample.kind == "dicom-series":
        slices = [_dicom_pixels(pydicom.dcmread(h.filename))[0] for h in sample.headers]  # each [C, H, W]
        if len({s.shape for s in slices}) > 1:
            raise ValueError("the slices of this series differ in size")
        volume = np.stack(slices, axis=1)  # [C, D, H, W]
        return Scan(volume, (_slice_spacing(sample.headers), row, column), modality)
    dataset = pydicom.dcmread(sample.paths[0])
    frames = _dicom_pixels(dataset)  # [F, C, H, W]
    if len(frames) == 1:
        return Scan(frames[0], (row, column), modality)
    order, depth = _frame_order(dataset, len(frames))
    return Scan(np.ascontiguousarray(frames[order].transpose(1, 0, 2, 3)), (depth, row, column), modality)


def _frame_order(dataset, count: int) -> tuple[np.ndarray, float]:
    """Frame order and slice spacing of a multi-frame file: per-frame plane positions (enhanced
    CT/MR), GridFrameOffsetVector (RT dose), or the stored order."""
    positions = None
    if "PerFrameFunctionalGroupsSequence" in dataset:
        groups = dataset.PerFrameFunctionalGroupsSequence
        shared = dataset.get("SharedFunctionalGroupsSequence", [None])[0]
        try:
            normal_source = shared.PlaneOrientationSequence[0] if shared and "PlaneOrientationSequence" in shared \
                else groups[0].PlaneOrientationSequence[0]
            normal = _slice_normal(normal_source)
            positions = [float(np.dot(np.array(g.PlanePositionSequence[0].ImagePositionPatient, float), normal))
                         for g in groups]
        except (AttributeError, IndexError, KeyError, TypeError):
            positions = None
    elif dataset.get("GridFrameOffsetVector") is not None:
        positions = [float(v) for v in dataset.GridFrameOffsetVector]
    if positions is None or len(positions) != count:
        thickness = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0
        return np.arange(count), float(thickness)
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(np.asarray(positions)[order])
    return order, float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else 1.0


def _rel(path: Path, root: Path) -> str:
    relative = path.relative_to(root).as_posix()
    return relative if relative != "." else path.name


def describe_error(exc: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__
