"""All MedMNIST datasets (12 2D, 6 3D) at every size `medmnist.INFO` offers, from local `.npz` files.

Registered names follow the official files: `retinamnist` (28), `retinamnist_64`, `retinamnist_128`,
`retinamnist_224`; `adrenalmnist3d` (28), `adrenalmnist3d_64`. Labels keep MedMNIST's task types:
binary, multi-class and ordinal tasks give one class index per sample ([N, 1]); ChestMNIST
(multi-label) gives one 0/1 column per finding ([N, 14]). `labeled=False` drops the labels
(self-supervision); `label_fraction < 1` keeps a stratified, seeded part of the train split.
`DatasetOptions.extra["mmap"]` is `auto` (default), `always` or `never` (see medmnist_files).
"""

from medformer_core import (
    DatasetFactory,
    DatasetInfo,
    DatasetOptions,
    ImageSplit,
    MedformerError,
    UsageError,
    hookimpl,
    stratified_subset,
)
from medformer_core.api.datasets import default_data_root
from medformer_plugins.medmnist_files import (
    INSTALL,
    SPLITS,
    NpzFile,
    Variant,
    all_variants,
    check_headers,
    check_md5,
    locate,
    read_images,
    read_labels,
    sizes_offered,
)


class MedMNIST(DatasetFactory):
    """One MedMNIST file (dataset at one size). Without the medmnist package it is still registered, and
    using it says how to install the package."""

    def __init__(self, variant: Variant):
        self.variant = variant
        self.name = variant.name
        self.spatial_dims = (variant.spatial_dims,)
        try:
            meta = variant.meta
        except MedformerError:
            self.description = f"MedMNIST {variant.flag}: needs `{INSTALL}`"
            return
        self.channels = meta["n_channels"]
        self.description = f"{meta['python_class']}: {meta['task']}, {len(meta['label'])} classes"

    def info(self, options: DatasetOptions) -> DatasetInfo:
        meta = self.variant.meta
        return DatasetInfo(
            name=self.name,
            spatial_dims=self.variant.spatial_dims,
            channels=self.channels,
            size=(self.variant.size,) * self.variant.spatial_dims,
            task=meta["task"],
            labels={int(k): v for k, v in meta["label"].items()},
            split_sizes=dict(meta["n_samples"]),
        )

    def build(self, split: str, options: DatasetOptions) -> ImageSplit:
        if split not in SPLITS:
            raise UsageError(f"dataset '{self.name}' has no split '{split}'", hint=f"choose one of {', '.join(SPLITS)}")
        self._check_size(options.size)
        path = locate(self.variant, options.data_root or default_data_root())
        if options.verify_md5:
            check_md5(self.variant, path)
        with NpzFile(path, mmap=options.extra.get("mmap", "auto")) as npz:
            check_headers(self.variant, npz, split)
            labels = read_labels(self.variant, npz, split) if options.labeled else None
            images = read_images(self.variant, npz, split)
        data = ImageSplit(self.info(options), images, labels)
        if labels is not None and split == "train" and options.label_fraction < 1.0:
            data = data.subset(stratified_subset(labels, options.label_fraction, options.seed))
        return data

    def _check_size(self, size: int | None) -> None:
        if size in (None, self.variant.size):
            return
        offered = sizes_offered(self.variant.flag)
        hint = (f"use dataset '{Variant(self.variant.flag, size).name}'" if size in offered
                else f"{self.variant.flag} comes in sizes {', '.join(map(str, offered))}")
        raise UsageError(f"dataset '{self.name}' is {self.variant.size} voxels a side, not {size}", hint=hint)


@hookimpl
def register_datasets(register):
    for variant in all_variants():
        register(MedMNIST(variant))
