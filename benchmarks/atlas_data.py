"""The Colin27 T1 brain and its AAL atlas (Debian package mricron-data) as segmentation data.

Finding the data: `locate_templates()` looks in $MEDFORMER_ATLAS_DIR, /usr/share/mricron/templates
and the cache $MEDFORMER_CACHE_DIR/mricron (default ~/.cache/medformer/mricron); when none holds
the templates it fetches the package into the cache (`apt-get download mricron-data`, MD5-checked
against `apt-cache show`, unpacked with dpkg-deb or in Python) and returns (None, why) when that
is impossible.

Preparing the check (`prepare`): the brain-extracted T1 `ch2bet` (1 mm) and the AAL atlas, which
was drawn on this very brain, resampled onto the T1's grid through both affines when the grids
differ (nearest neighbour). Its 116 regions are grouped into `CLASSES`. The volume is cropped to
the brain and split by world x into two disjoint parts: the left hemisphere (x < 0 mm) for
training and the right one (x >= 0 mm) for testing. A slab of the left hemisphere, world y in
VAL_Y_MM (48 mm through the thalamus, the putamen and the front of the cerebellum), is held out
whole for validation: training blocks are cut from the left hemisphere in front of and behind it,
so none of them touches it, and the pretraining volumes have it blanked. Intensities are scaled once for the whole
volume (0.5..99.5 percentiles to 0..255, uint8), so that a block read with `intensity=none` and
the test part read by `medformer predict` see the same values. Files:

    OUT/seg/dataset.json                 the classes
    OUT/seg/train/imagesTr, labelsTr     overlapping blocks of the left hemisphere outside the val slab
    OUT/seg/val/imagesTr, labelsTr       blocks of the val slab
    OUT/seg/test/imagesTr, labelsTr      non-overlapping blocks of the right hemisphere
    OUT/val/images/val.nii.gz            the val slab, for `medformer predict`
    OUT/val/labels/val.nii.gz            its classes, in the same grid
    OUT/test/images/right.nii.gz         the right hemisphere, for `medformer predict`
    OUT/test/labels/right.nii.gz         its classes, in the same grid
    OUT/pretrain/*.nii.gz                unlabeled T1 volumes at their native resolution

Every block and part keeps its own affine (the T1's, shifted to its first voxel), so all of them
lie in the T1's physical space.
"""

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "mricron-data"
TEMPLATES = Path("usr/share/mricron/templates")  # inside the package
SYSTEM_DIR = Path("/") / TEMPLATES
KNOWN_MD5 = {"1.2.20211006+dfsg-4": "bbc3f2eeaa1fbf251527d7cb60c255e3"}  # used when apt-cache has no record
REQUIRED = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")
COLIN27_T1 = ("ch2.nii.gz", "ch2bet.nii.gz", "ch2better.nii.gz")  # one brain: only its left half is pretrained on
OTHER_T1 = ("inia19-t1-brain.nii.gz",)  # the INIA19 rhesus macaque template: another brain, kept whole
# AAL region names (aal.nii.txt) by prefix -> class; every region falls in exactly one class.
CLASSES = {
    1: ("cerebral cortex", ("Precentral", "Frontal", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                           "Cingulum", "Insula", "Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus",
                           "Paracentral_Lobule", "Heschl", "Temporal", "Hippocampus", "ParaHippocampal", "Amygdala",
                           "Fusiform", "Calcarine", "Cuneus", "Lingual", "Occipital")),
    2: ("deep grey nuclei", ("Caudate", "Putamen", "Pallidum", "Thalamus")),
    3: ("cerebellum", ("Cerebelum", "Vermis")),
}
MIN_LABELED = 0.1  # a block is kept when at least this fraction of its voxels carries a class
MARGIN = 4  # voxels kept around the brain when cropping
VAL_Y_MM = (-46.0, 2.0)  # world y (mm) of the left hemisphere's val slab, [start, stop)


class FetchError(Exception):
    """The package could not be fetched, checked or unpacked (the message says why)."""


# -- finding and fetching ----------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("MEDFORMER_CACHE_DIR") or "~/.cache/medformer").expanduser() / "mricron"


def locate_templates(fetch: bool = True) -> tuple[Path | None, str]:
    """(the templates folder, where it came from), or (None, why not) when the data is unavailable."""
    cache = cache_root()
    candidates = [Path(p).expanduser() for p in [os.environ.get("MEDFORMER_ATLAS_DIR")] if p]
    candidates += [SYSTEM_DIR, cache / TEMPLATES]
    for folder in candidates:
        if all((folder / name).is_file() for name in REQUIRED):
            return folder, f"found in {folder}"
    looked = ", ".join(map(str, candidates))
    if not fetch:
        return None, f"the Colin27 templates ({', '.join(REQUIRED)}) are not in {looked}"
    try:
        return fetch_templates(cache), f"fetched into {cache}"
    except FetchError as exc:
        return None, f"the Colin27 templates are not in {looked}, and fetching {PACKAGE} failed: {exc}"


def fetch_templates(cache: Path) -> Path:
    """Download the package into `cache`, check its MD5 and unpack it there; the templates folder."""
    if shutil.which("apt-get") is None:
        raise FetchError("apt-get is not available (set MEDFORMER_ATLAS_DIR to a copy of the templates)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as temp:
        done = subprocess.run(["apt-get", "download", PACKAGE], cwd=temp, capture_output=True, text=True,
                              timeout=600)
        debs = sorted(Path(temp).glob(f"{PACKAGE}_*.deb"))
        if done.returncode != 0 or not debs:
            raise FetchError(f"`apt-get download {PACKAGE}` failed ({(done.stderr or done.stdout).strip()[-300:]})")
        deb = debs[0]
        version = deb.name.split("_")[1].replace("%3a", ":")
        expected = apt_md5(version) or KNOWN_MD5.get(version)
        if expected is None:
            raise FetchError(f"no MD5 known for {PACKAGE} {version} (`apt-cache show {PACKAGE}` has none)")
        actual = hashlib.md5(deb.read_bytes()).hexdigest()
        if actual != expected:
            raise FetchError(f"{deb.name} has MD5 {actual}, expected {expected}")
        unpacked = Path(temp) / "root"
        extract_deb(deb, unpacked)
        target = cache / TEMPLATES
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (unpacked / TEMPLATES).rename(target)
    return target


def apt_md5(version: str) -> str | None:
    """The MD5sum `apt-cache show` lists for `version` of the package, or None."""
    try:
        shown = subprocess.run(["apt-cache", "show", PACKAGE], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for stanza in shown.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, flags=re.MULTILINE))
        if fields.get("Version") == version and "MD5sum" in fields:
            return fields["MD5sum"].strip()
    return None


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the files of a .deb into `dest`: dpkg-deb when present, else its ar and tar in Python."""
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True, timeout=600)
        return
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb.name} is not a Debian archive")
    offset = 8
    while offset + 60 <= len(data):
        name, size = data[offset:offset + 16].decode().strip().rstrip("/"), int(data[offset + 48:offset + 58])
        member = data[offset + 60:offset + 60 + size]
        offset += 60 + size + size % 2
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                member = lzma.decompress(member)
            elif name.endswith(".gz"):
                member = gzip.decompress(member)
            elif name != "data.tar":
                raise FetchError(f"{deb.name}: {name} is compressed in a way Python cannot read (install dpkg)")
            with tarfile.open(fileobj=io.BytesIO(member)) as tar:
                tar.extractall(dest, filter="data")
            return
    raise FetchError(f"{deb.name} has no data.tar member")


# -- geometry ------------------------------------------------------------------------------------------


def on_grid(labels, target) -> np.ndarray:
    """The label image `labels` on the voxel grid of image `target` by nearest neighbour in world
    coordinates (through both affines): [*target.shape[:3]], 0 where `labels` has no voxel."""
    data = np.asarray(labels.dataobj)
    if labels.shape[:3] == target.shape[:3] and np.allclose(labels.affine, target.affine, atol=1e-4):
        return data
    to_labels = np.linalg.inv(labels.affine) @ target.affine  # target voxel -> labels voxel
    shape = np.array(data.shape[:3])[:, None, None]
    out = np.zeros(target.shape[:3], data.dtype)
    i, j = np.meshgrid(np.arange(target.shape[0]), np.arange(target.shape[1]), indexing="ij")
    for k in range(target.shape[2]):
        voxels = np.stack([i, j, np.full_like(i, k), np.ones_like(i)])  # [4, X, Y]
        source = np.rint(np.tensordot(to_labels[:3], voxels, axes=1)).astype(np.int64)  # [3, X, Y]
        inside = np.all((source >= 0) & (source < shape), axis=0)
        out[:, :, k][inside] = data[source[0][inside], source[1][inside], source[2][inside]]
    return out


def shifted(affine: np.ndarray, start) -> np.ndarray:
    """The affine of a sub-volume whose first voxel is voxel `start` (i, j, k) of `affine`'s grid."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, np.float64) + affine[:3, 3]
    return out


def centroids(mask: np.ndarray, affine: np.ndarray, classes) -> dict[int, list[float] | None]:
    """World (mm) centroid of each class of `mask` [X, Y, Z] through `affine`; None for an absent class."""
    found = {}
    for c in classes:
        voxels = np.argwhere(mask == c)
        found[c] = None if len(voxels) == 0 else (affine[:3, :3] @ voxels.mean(0) + affine[:3, 3]).tolist()
    return found


# -- the atlas as classes ----------------------------------------------------------------------------


def aal_lookup(names_file: Path) -> np.ndarray:
    """AAL region index -> class (`CLASSES`) as an array indexed by region, from aal.nii.txt
    ("index name code" per line)."""
    regions = [line.split()[:2] for line in names_file.read_text().splitlines() if line.strip()]
    lookup = np.zeros(max(int(index) for index, _ in regions) + 1, np.uint8)
    for index, name in regions:
        matches = [c for c, (_, prefixes) in CLASSES.items() if name.startswith(prefixes)]
        if len(matches) != 1:
            raise ValueError(f"AAL region {name} falls in {len(matches)} classes, expected 1")
        lookup[int(index)] = matches[0]
    return lookup


@dataclass
class Part:
    """A box of the T1 grid: image and classes [X, Y, Z] uint8 and the box's own affine."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    def box(self, start, size) -> "Part":
        (i, j, k), (a, b, c) = start, size
        return Part(self.image[i:i + a, j:j + b, k:k + c], self.labels[i:i + a, j:j + b, k:k + c],
                    shifted(self.affine, start))


def atlas_volume(templates: Path):
    """The T1 (RAS+), scaled to uint8 over the whole volume, with the AAL classes on its grid, cropped
    to the brain: a Part, and the T1 NIfTI header to write parts with."""
    import nibabel as nib

    t1 = nib.as_closest_canonical(nib.load(templates / "ch2bet.nii.gz"))
    atlas = nib.load(templates / "aal.nii.gz")
    regions = on_grid(atlas, t1)
    classes = aal_lookup(templates / "aal.nii.txt")[regions]
    x = np.asarray(t1.dataobj, np.float32)
    low, high = np.percentile(x, [0.5, 99.5])
    image = np.round(np.clip((x - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)
    brain = np.argwhere((x > 0) | (classes > 0))
    start = np.maximum(brain.min(0) - MARGIN, 0)
    stop = np.minimum(brain.max(0) + 1 + MARGIN, x.shape)
    return Part(image, classes, t1.affine).box(start, stop - start), t1.header


def hemispheres(volume: Part) -> tuple[Part, Part]:
    """(left: world x < 0, right: x >= 0), disjoint boxes of an RAS+ volume whose first axis is x."""
    affine = volume.affine
    if not (affine[0, 0] > 0 and np.allclose(affine[0, 1:3], 0)):
        raise ValueError("the T1's first voxel axis must run along world x (left to right)")
    x = affine[0, 0] * np.arange(volume.image.shape[0]) + affine[0, 3]  # world x of each i
    middle = int(np.searchsorted(x, 0.0))  # first voxel with x >= 0
    rest = volume.image.shape[1:]
    return volume.box((0, 0, 0), (middle,) + rest), volume.box((middle, 0, 0), (x.size - middle,) + rest)


def block_starts(shape, block: int, stride: int, to_end: bool = False) -> list[tuple[int, int, int]]:
    """Starts of the blocks of side `block` every `stride` voxels that fit in `shape`; with `to_end`
    also the last block that fits on each axis, so that the blocks cover the whole box."""
    axes = []
    for n in shape:
        starts = list(range(0, n - block + 1, stride))
        if to_end and starts and starts[-1] != n - block:
            starts.append(n - block)
        axes.append(starts)
    return [(i, j, k) for i in axes[0] for j in axes[1] for k in axes[2]]


def labeled_blocks(part: Part, block: int, stride: int, to_end: bool = False,
                   offset=(0, 0, 0)) -> list[tuple[str, Part]]:
    """The blocks of `part` with at least MIN_LABELED of their voxels in a class, named by start
    (plus `offset`, the part's place in a larger box)."""
    blocks = [(f"b{i + offset[0]:03d}_{j + offset[1]:03d}_{k + offset[2]:03d}", part.box((i, j, k), (block,) * 3))
              for i, j, k in block_starts(part.image.shape, block, stride, to_end)]
    return [(name, b) for name, b in blocks if (b.labels > 0).mean() >= MIN_LABELED]


def val_slab(left: Part, y_mm=VAL_Y_MM) -> tuple[Part, list[tuple[Part, int]]]:
    """(the slab of `left` with world y in [y_mm), [(each part in front of / behind it, its first y
    voxel)]): disjoint boxes; blocks cut from the second never touch the first."""
    affine = left.affine
    if not (affine[1, 1] > 0 and np.allclose(affine[1, [0, 2]], 0)):
        raise ValueError("the T1's second voxel axis must run along world y (back to front)")
    y = affine[1, 1] * np.arange(left.image.shape[1]) + affine[1, 3]
    start, stop = (int(np.searchsorted(y, v)) for v in y_mm)
    x, ny, z = left.image.shape
    rest = [(left.box((0, 0, 0), (x, start, z)), 0), (left.box((0, stop, 0), (x, ny - stop, z)), stop)]
    return left.box((0, start, 0), (x, stop - start, z)), [(p, j) for p, j in rest if p.image.shape[1] > 0]


# -- writing ---------------------------------------------------------------------------------------------


def write_nifti(array: np.ndarray, affine: np.ndarray, header, path: Path) -> None:
    """A uint8 volume [X, Y, Z] with `affine` (qform and sform), the T1's header otherwise."""
    import nibabel as nib

    header = header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine, header)
    image.set_qform(affine, code=int(header["qform_code"]) or 1)
    image.set_sform(affine, code=int(header["sform_code"]) or 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def write_case(part: Part, header, root: Path, split: str, name: str) -> None:
    write_nifti(part.image, part.affine, header, root / split / "imagesTr" / f"{name}.nii.gz")
    write_nifti(part.labels, part.affine, header, root / split / "labelsTr" / f"{name}.nii.gz")


def write_classes(root: Path) -> None:
    labels = {"0": "background"} | {str(c): name for c, (name, _) in CLASSES.items()}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "colin27-aal", "labels": labels}, indent=2))


@dataclass
class Prepared:
    seg: Path  # the segmentation dataset folder (train/val/test of imagesTr + labelsTr)
    test_images: Path  # the right hemisphere, for `medformer predict --input`
    test_labels: Path  # its classes, same grid and name
    val_images: Path  # the val slab of the left hemisphere, for `medformer predict --input`
    val_labels: Path  # its classes
    pretrain: Path  # unlabeled T1 volumes
    counts: dict[str, int]  # blocks per split


def prepare(templates: Path, out: Path, block: int = 48, stride: int = 16,
            pretrain_volumes: tuple[str, ...] = COLIN27_T1 + OTHER_T1) -> Prepared:
    """Write the check's datasets into `out` (see the module docstring), with the T1s
    `pretrain_volumes` for pretraining; existing files are replaced."""
    if out.exists():
        shutil.rmtree(out)
    volume, header = atlas_volume(templates)
    left, right = hemispheres(volume)
    val, rest = val_slab(left)
    seg = out / "seg"
    write_classes(seg)
    train = [b for part, j in rest for b in labeled_blocks(part, block, stride, to_end=True, offset=(0, j, 0))]
    for name, part in train:
        write_case(part, header, seg, "train", name)
    held = labeled_blocks(val, block, stride, to_end=True)
    for name, part in held:
        write_case(part, header, seg, "val", name)
    test = labeled_blocks(right, block, block)
    for name, part in test:
        write_case(part, header, seg, "test", name)
    for split, part, name in (("test", right, "right"), ("val", val, "val")):
        write_nifti(part.image, part.affine, header, out / split / "images" / f"{name}.nii.gz")
        write_nifti(part.labels, part.affine, header, out / split / "labels" / f"{name}.nii.gz")
    write_pretraining(templates, out / "pretrain", pretrain_volumes)
    counts = {"train": len(train), "val": len(held), "test": len(test)}
    return Prepared(seg, out / "test" / "images", out / "test" / "labels", out / "val" / "images",
                    out / "val" / "labels", out / "pretrain", counts)


def write_pretraining(templates: Path, out: Path, names: tuple[str, ...]) -> None:
    """Unlabeled T1s `names` at their native resolution: the left half (x < 0 mm) of a Colin27 volume
    (the right half is the test part) with the val slab (VAL_Y_MM) set to 0, other brains whole."""
    import nibabel as nib

    for name in names:
        if not (templates / name).is_file():
            continue
        image = nib.as_closest_canonical(nib.load(templates / name))
        data = np.asarray(image.dataobj)
        if name in COLIN27_T1:
            x = image.affine[0, 0] * np.arange(data.shape[0]) + image.affine[0, 3]
            data = data[: int(np.searchsorted(x, 0.0))].copy()
            y = image.affine[1, 1] * np.arange(data.shape[1]) + image.affine[1, 3]
            data[:, int(np.searchsorted(y, VAL_Y_MM[0])):int(np.searchsorted(y, VAL_Y_MM[1]))] = 0
        out.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine, image.header), out / name)

