"""`medformer predict`: segment whole scans with a segmentation fine-tune.

Each input (a NIfTI volume for a 3D model; a PNG/JPEG image or a 2D NIfTI for a 2D model) is
brought into the orientation the folder dataset reads (RAS+, [C, Z, Y, X] with anterior up),
scaled to [0, 1] as the run's dataset scales its samples (`DatasetFactory.scale_intensities`),
resampled to the voxel spacing the model was trained at (when its dataset set one), predicted by
a sliding window of the model's input size (overlap, Gaussian blending), resampled back and
written in the input's own voxel order: OUT/NAME.nii.gz with the input's affine and header
(OUT/NAME.png for a picture), and a preview OUT/NAME_overlay.png, the middle slice(s) with the
mask in colour.
"""

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medformer_core.api.datasets import resolve_dataset
from medformer_core.api.errors import DataError, MedformerError, UsageError
from medformer_core.api.files import atomic_write
from medformer_core.api.resampling import grid_for_spacing, resample
from medformer_core.downstream.finetune import SEGMENTATION_TASK, load_finetuned, read_finetune_config, task_for
from medformer_core.downstream.sliding_window import sliding_window
from medformer_core.engine.devices import resolve_device

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]])


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)  # the masks
    padded: list[str] = field(default_factory=list)  # inputs smaller than the window (zero-padded)
    non_finite: list[str] = field(default_factory=list)  # inputs with NaN/inf voxels (filled), and how many


def scan_stem(path: Path) -> str:
    """The name of a scan without its format's suffix: "a.v2.nii.gz" -> "a.v2", "p.png" -> "p"."""
    lower = path.name.lower()
    suffix = next((s for s in (".nii.gz", *NIFTI_SUFFIXES, *PICTURE_SUFFIXES) if lower.endswith(s)), "")
    return path.name[:len(path.name) - len(suffix)]


def output_names(files: list[Path], inputs: Path, out_dir: Path) -> dict[Path, str]:
    """Each input's mask name under `out_dir` (its stem, under its sub-folder of `inputs`). Raises a
    UsageError before anything is written when two inputs would share a mask, or when a mask or
    preview would land on an input or inside the scanned folder."""
    root = inputs if inputs.is_dir() else inputs.parent
    names = {path: str(path.parent.relative_to(root) / scan_stem(path)) if inputs.is_dir() else scan_stem(path)
             for path in files}
    seen: dict[str, Path] = {}
    for path, name in names.items():
        if name in seen:
            raise UsageError(f"--input holds {seen[name]} and {path}, which would both write the mask '{name}'",
                             hint="rename one of them, or predict them into different --out folders")
        seen[name] = path
    resolved_out = out_dir.resolve()
    if inputs.is_dir() and (resolved_out == inputs.resolve() or inputs.resolve() in resolved_out.parents):
        raise UsageError(f"--out {out_dir} is inside --input {inputs}: the masks would overwrite or mix with the scans",
                         hint="choose an --out folder outside the scans")
    inputs_resolved = {path.resolve() for path in files}
    for name in names.values():
        for written in (out_dir / f"{name}.nii.gz", out_dir / f"{name}.png", out_dir / f"{name}_overlay.png"):
            if written.resolve() in inputs_resolved:
                raise UsageError(f"predicting would overwrite the input {written}",
                                 hint="choose another --out folder")
    return names


def find_inputs(path: Path) -> list[Path]:
    """A scan file, or every NIfTI and picture under a directory (sorted)."""
    if not path.exists():
        raise UsageError(f"--input {path} does not exist", hint="give a scan file or a directory of scans")
    is_scan = lambda p: p.name.lower().endswith(NIFTI_SUFFIXES + PICTURE_SUFFIXES) and not p.name.startswith(".")  # noqa: E731
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and is_scan(p))
    if not found:
        raise UsageError(f"no NIfTI or picture files in {path}", hint="supported: .nii, .nii.gz, .png, .jpg, .tif")
    return found


def predict_run(run_dir: Path, inputs: Path, out_dir: Path, overlap: float = 0.5, device: str = "auto",
                batch_size: int = 32, data_root: str | None = None) -> PredictReport:
    """Segment every scan of `inputs` with the fine-tune in `run_dir`, writing into `out_dir`."""
    config = read_finetune_config(run_dir / "finetune.toml")
    factory, options = resolve_dataset(config.dataset, data_root=data_root or config.data_root, seed=config.seed)
    info = factory.info(options)
    if task_for(config, info) != SEGMENTATION_TASK:
        raise UsageError(f"{run_dir} is a classification fine-tune", hint="predict needs a --task segmentation run")
    target = resolve_device(device)
    model = load_finetuned(run_dir, info, config).to(target).eval()
    files = find_inputs(inputs)
    names = output_names(files, inputs, out_dir)
    report = PredictReport()

    def probabilities(windows: torch.Tensor) -> torch.Tensor:  # [B, C, *W] -> [B, K, *W]
        batch = {"image": windows.to(target), "dataset": info.name, "spatial_dims": info.spatial_dims}
        return model.predict(batch, task=SEGMENTATION_TASK).cpu()

    for path in files:
        scan = read_scan(path, info.spatial_dims)
        if scan.array.shape[0] != info.channels:
            raise DataError(f"{path}: {scan.array.shape[0]} channel(s), the model takes {info.channels}",
                            hint="give scans of the modality the model was fine-tuned on")
        bad = int(np.size(scan.array) - np.isfinite(scan.array).sum()) if scan.array.dtype.kind == "f" else 0
        if bad:
            report.non_finite.append(f"{path.name} ({bad} voxel(s))")
        image = torch.from_numpy(factory.scale_intensities(scan.array, options))  # [C, *S] in [0, 1]
        grid = grid_for_spacing(image.shape[1:], scan.spacing, info.spacing)
        if any(s < w for s, w in zip(grid, info.size)):
            report.padded.append(f"{path.name} {'x'.join(map(str, grid))}")
        scores = sliding_window(resample(image, grid), probabilities, tuple(info.size), overlap, batch_size)
        mask = resample(scores, tuple(image.shape[1:])).argmax(0).numpy()  # [*S]
        name = names[path]
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        report.written.append(scan.write_mask(mask.astype(np.uint8), out_dir, name))
        write_overlay(image.numpy(), mask, out_dir / f"{name}_overlay.png")
    return report


@dataclass
class ReadScan:
    """A scan in model orientation, `array` [C, *S], and how to write a mask [*S] back in the
    input's own voxel order (`restore`) and format (`source`, `nifti` image or None for pictures)."""

    array: np.ndarray
    source: Path
    nifti: object = None
    orientation: np.ndarray | None = None
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)  # mm per axis of `array` ([Z, Y, X] or [Y, X])

    def write_mask(self, mask: np.ndarray, out_dir: Path, name: str) -> Path:
        if self.nifti is None:
            from PIL import Image

            path = out_dir / f"{name}.png"
            with atomic_write(path) as temp:
                Image.fromarray(mask).save(temp, format="PNG")
            return path
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        voxels = mask[:, ::-1].T if mask.ndim == 3 else mask[::-1].T  # [Z, Y, X] -> [X, Y, Z], anterior back
        if voxels.ndim < len(self.orientation):
            voxels = voxels[..., None]
        voxels = apply_orientation(voxels, ornt_transform(axcodes2ornt("RAS"), self.orientation))
        header = self.nifti.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(np.ascontiguousarray(voxels).reshape(self.nifti.shape[:3]), self.nifti.affine, header)
        path = out_dir / f"{name}.nii.gz"
        with atomic_write(path) as temp:
            temp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6))
        return path


def read_scan(path: Path, spatial_dims: int) -> ReadScan:
    """Read one input for a model of `spatial_dims`: a NIfTI (3D, 4D: channels last; 2D for a 2D
    model) or a picture (2D only)."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, spatial_dims)
    if spatial_dims != 2:
        raise DataError(f"{path}: a picture, but the model segments 3D volumes", hint="give NIfTI volumes")
    from PIL import Image

    try:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("L" if picture.mode in ("1", "L", "LA", "I", "F") else "RGB"))
    except OSError as exc:
        raise DataError(f"{path}: not a readable picture ({exc})".splitlines()[0]) from None
    return ReadScan(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1), path, spacing=(1.0, 1.0))


def _read_nifti(path: Path, spatial_dims: int) -> ReadScan:
    try:
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
    except ImportError:
        raise MedformerError("reading NIfTI needs nibabel", hint="pip install 'medformer[nifti]'") from None
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)  # scaled by the header's slope and intercept when it has them
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI ({exc})".splitlines()[0],
                        hint="check the file, or leave it out of --input") from None
    shape = image.shape
    depth = shape[2] if len(shape) >= 3 else 1
    if (spatial_dims == 3 and (len(shape) not in (3, 4) or depth == 1)) or (spatial_dims == 2 and depth != 1):
        raise DataError(f"{path}: shape {shape} is not a {spatial_dims}D scan",
                        hint=f"the model segments {spatial_dims}D {'volumes' if spatial_dims == 3 else 'images'}")
    orientation = io_orientation(image.affine)
    data = data.reshape(shape[:3] + (-1,)) if len(shape) >= 3 else data.reshape(shape + (1, 1))  # [X, Y, Z, C]
    data = apply_orientation(data, ornt_transform(orientation, axcodes2ornt("RAS")))
    array = np.ascontiguousarray(data.transpose(3, 2, 1, 0)[:, :, ::-1])  # [C, Z, Y, X], anterior up
    sizes = np.ones(3)
    sizes[orientation[:, 0].astype(int)] = nib.affines.voxel_sizes(image.affine)[:3]  # [X, Y, Z] in RAS
    spacing = tuple(float(s) for s in sizes[::-1])  # [Z, Y, X]
    if spatial_dims == 2:
        array, spacing = array[:, 0], spacing[1:]
    return ReadScan(array, path, image, orientation, spacing)


def write_overlay(image: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """A preview PNG: image [C, *S] in [0, 1] in grey with mask [*S] in colour (class k: colour k - 1),
    the three orthogonal middle slices side by side for a volume."""
    from PIL import Image

    grey, planes = image.mean(axis=0), []
    if mask.ndim == 2:
        planes = [(grey, mask)]
    else:
        for axis in range(3):
            middle = mask.shape[axis] // 2
            planes.append((np.take(grey, middle, axis=axis), np.take(mask, middle, axis=axis)))
    height = max(p[0].shape[0] for p in planes)
    tiles = []
    for picture, labels in planes:
        rgb = np.repeat(picture[..., None] * 255.0, 3, axis=-1)
        colour = COLOURS[(labels.astype(int) - 1) % len(COLOURS)]
        rgb = np.where(labels[..., None] > 0, 0.5 * rgb + 0.5 * colour, rgb)
        tiles.append(np.pad(rgb, ((0, height - rgb.shape[0]), (0, 2), (0, 0))))
    with atomic_write(path) as temp:
        Image.fromarray(np.concatenate(tiles, axis=1).astype(np.uint8)).save(temp, format="PNG")
