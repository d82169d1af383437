"""The multitask model as the training engine meets it: which tasks run on which batch, predictions,
pictures, the accept check before training, and clear errors for batches it was not built for."""

import pytest
import torch
from PIL import Image

from medformer_core.api.errors import UsageError
from medformer_core.api.interfaces import PretextTask
from medformer_core.api.plugins import registries
from medformer_core.model.multitask import check_tasks_accept


def tasks(*names: str) -> list[PretextTask]:
    return [registries().tasks.get(name) for name in names]


def test_each_batch_runs_the_tasks_that_accept_its_dataset(tiny_model, phantom_batch):
    model = tiny_model(tasks("mae", "mae3d", "rotation", "slice-position"))
    generator = torch.Generator().manual_seed(0)
    flat, volume = (phantom_batch(info) for info in model.dataset_infos)
    assert set(model(flat, generator)) == {"mae", "rotation"}
    assert set(model(volume, generator)) == {"mae3d", "rotation", "slice-position"}


def test_slice_position_adds_a_2d_adapter_for_the_volumes_channels(tiny_model, phantom_info):
    model = tiny_model(tasks("slice-position"), [phantom_info(3, channels=2)])
    assert set(model.encoder.adapters) == {"patch3d_2ch", "patch2d_2ch"}


def test_label_tasks_skip_unlabeled_batches(tiny_model, phantom_batch, phantom_info):
    model = tiny_model(tasks("supervised", "rotation"))
    batch = phantom_batch(phantom_info(2))
    del batch["label"]
    assert set(model(batch, torch.Generator().manual_seed(0))) == {"rotation"}


def test_a_task_that_accepts_no_dataset_is_refused_before_training(tiny_model, phantom_info):
    with pytest.raises(UsageError, match=r"task 'mae3d' accepts none of the run's datasets: phantoms2d \(2D"):
        check_tasks_accept(tasks("mae3d"), [phantom_info(2)])
    with pytest.raises(UsageError, match="'domain-adversarial' accepts none.*at least two"):
        tiny_model(tasks("domain-adversarial"), [phantom_info(3)])
    with pytest.raises(UsageError, match="'rotation' is requested twice"):
        check_tasks_accept(tasks("rotation", "rotation"), [phantom_info(2)])


def test_a_task_missing_its_methods_is_refused_by_name(phantom_info):
    class Half(PretextTask):
        name = "half"

    with pytest.raises(UsageError, match="'half' cannot train: it does not implement output_spec, make_view, loss"):
        check_tasks_accept([Half()], [phantom_info(2)])


def test_predict_gives_supervised_scores(tiny_model, phantom_batch, phantom_info):
    model = tiny_model(tasks("supervised", "rotation"))
    model.eval()
    with torch.no_grad():
        scores = model.predict(phantom_batch(phantom_info(2)))
    assert scores.shape == (4, 4) and torch.allclose(scores.sum(dim=1), torch.ones(4))
    with pytest.raises(UsageError, match="'rotation' makes no predictions"):
        model.predict(phantom_batch(phantom_info(2)), task="rotation")
    with pytest.raises(UsageError, match="no 'jigsaw' output"):
        model.predict(phantom_batch(phantom_info(2)), task="jigsaw")


def test_batches_the_model_was_not_built_for_are_clear_errors(tiny_model, phantom_batch, phantom_info):
    model = tiny_model(tasks("rotation"))
    batch = phantom_batch(phantom_info(2))
    with pytest.raises(UsageError, match="not built for dataset 'other'"):
        model({**batch, "dataset": "other"}, torch.Generator())
    with pytest.raises(UsageError, match=r"has images \[4, 1, 8, 8\], the model expects \[B, 1, 12, 12\]"):
        model({**batch, "image": batch["image"][..., :8, :8]}, torch.Generator())


def test_domain_adversarial_shares_one_classifier_across_datasets(tiny_model):
    model = tiny_model(tasks("domain-adversarial", "rotation"))
    assert set(model.outputs["domain-adversarial"]) == {"all-datasets"}
    assert set(model.outputs["rotation"]) == {"phantoms2d", "phantoms3d"}


def test_pictures_are_png_grids_for_the_tasks_that_make_them(tmp_path, tiny_model, phantom_batch):
    model = tiny_model(tasks("mae", "mae3d", "restoration", "rotation"))
    model.train()
    written = []
    for info in model.dataset_infos:
        written += model.save_pictures(phantom_batch(info, count=3), torch.Generator().manual_seed(0), tmp_path, 7)
    assert sorted(p.name for p in written) == ["mae-phantoms2d-step000007.png", "mae3d-phantoms3d-step000007.png",
                                               "restoration-phantoms2d-step000007.png",
                                               "restoration-phantoms3d-step000007.png"]
    assert model.training  # restored after drawing
    with Image.open(tmp_path / "mae-phantoms2d-step000007.png") as flat, \
            Image.open(tmp_path / "mae3d-phantoms3d-step000007.png") as volume:
        assert flat.format == "PNG" and volume.width > 2 * flat.width  # three slices per cell in 3D
        assert flat.height == volume.height  # a row per sample, same cell height


def test_task_options_and_weights_are_set_by_keyword():
    mae = registries().tasks.get("mae")
    tuned = mae.with_options(weight=2.0, mask_ratio=0.6)
    assert (tuned.weight, tuned.options.mask_ratio, tuned.options.norm_pix_loss) == (2.0, 0.6, True)
    assert (mae.weight, mae.options.mask_ratio) == (1.0, 0.75)  # the registered task is unchanged
    with pytest.raises(UsageError, match="no option 'mask_rate'.*did you mean 'mask_ratio'"):
        mae.with_options(mask_rate=0.5)
    with pytest.raises(UsageError, match=r"task 'mae': mask_ratio must be in \(0, 1\)"):
        mae.with_options(mask_ratio=1.5)
    with pytest.raises(UsageError, match="weight must be >= 0"):
        mae.with_options(weight=-1)
