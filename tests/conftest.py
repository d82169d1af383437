"""Shared test set-up: no installed third-party plugin may leak into the suite; tiny models and
phantom batches; tiny MedMNIST-layout files and the real shared MedMNIST files."""

import os
from pathlib import Path

os.environ["MEDFORMER_LOAD_PLUGINS"] = "none"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from medformer_core.api import plugins  # noqa: E402
from medformer_core.api.data import DatasetInfo, DatasetOptions  # noqa: E402
from medformer_core.api.hookspecs import hookimpl  # noqa: E402
from medformer_core.api.interfaces import PretextTask  # noqa: E402
from medformer_core.engine.builders import build_model  # noqa: E402
from medformer_core.engine.schedule import warmup_cosine  # noqa: E402
from medformer_core.model.multitask import MultitaskModel  # noqa: E402
from medformer_plugins.medmnist_files import SPLITS, Variant, label_columns, sample_shape  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=32, depth=1, heads=2, latents=8, mlp_ratio=2.0)
PHANTOM_SIZES = {2: 12, 3: 8}
MEDMNIST_COUNTS = {"train": 12, "val": 4, "test": 4}


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins for one test (after it changes the environment or sys.path), and after it."""
    plugins.reset()
    yield monkeypatch
    plugins.reset()


@pytest.fixture
def register_task(fresh_plugins):
    """register_task(task): register `task` through the hooks, as an installed plugin would, for
    one test."""
    pm, _, _ = plugins.plugin_manager()
    names = []

    def register(task: PretextTask) -> None:
        class Plugin:
            @hookimpl
            def register_pretext_tasks(self, register):
                register(task)

        names.append(f"{task.name}-plugin")
        pm.register(Plugin(), name=names[-1])
        plugins.registries.cache_clear()

    yield register
    for name in names:
        pm.unregister(name=name)


@pytest.fixture
def run_cli(capsys):
    """Run the `medformer` CLI in-process; returns (exit code, stdout, stderr)."""
    from medformer_cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        captured = capsys.readouterr()
        code = exit_info.value.code
        return (0 if code is None else code), captured.out, captured.err

    return run


# -- phantoms and tiny models ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def phantom_info():
    """phantom_info(spatial_dims, size=None, channels=1, count=16): the DatasetInfo of phantoms{2,3}d."""

    def info(spatial_dims: int, size: int | None = None, channels: int = 1, count: int = 16) -> DatasetInfo:
        size = size or PHANTOM_SIZES[spatial_dims]
        options = DatasetOptions(argument=f"size={size},channels={channels},count={count}")
        return plugins.registries().datasets.get(f"phantoms{spatial_dims}d").info(options)

    return info


@pytest.fixture(scope="session")
def phantom_batch():
    """phantom_batch(info, count=4, start=0, seed=0): a batch of the phantoms `info` describes, built
    like the real train split."""

    def batch(info: DatasetInfo, count: int = 4, start: int = 0, seed: int = 0) -> dict:
        argument = f"size={info.size[0]},channels={info.channels},count={max(count + start, 16)}"
        split = plugins.registries().datasets.get(f"phantoms{info.spatial_dims}d").build(
            "train", DatasetOptions(argument=argument, seed=seed))
        return split.batch(range(start, start + count))

    return batch


@pytest.fixture(scope="session")
def tiny_model(phantom_info):
    """tiny_model(tasks, datasets=None, seed=0, **overrides): a seeded tiny multitask model, by
    default on 2D and 3D phantoms."""

    def model(tasks: list[PretextTask], datasets: list[DatasetInfo] | None = None, seed: int = 0,
              **overrides) -> MultitaskModel:
        torch.manual_seed(seed)
        datasets = datasets or [phantom_info(2), phantom_info(3)]
        return build_model("tiny", datasets, tasks, **{**TINY, **overrides})

    return model


@pytest.fixture(scope="session")
def shared_anatomy():
    """shared_anatomy(spatial_dims, size, count, off_centre=False): count images [count, 1, *S] that
    share most of their content, as the images of one medical set do: the same ball (0.5) in each,
    centred or, with off_centre, a third of the way along the first axis (its place then tells the
    orientation), plus one 3^dims cube (1.0) at a seeded random place, about 1% of the pixels or voxels."""

    def images(spatial_dims: int, size: int, count: int, off_centre: bool = False) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij")).float()
        first = size / 3 if off_centre else size / 2
        centre = torch.tensor([first] + [size / 2] * (spatial_dims - 1)).view(-1, *[1] * spatial_dims)
        ball = (grid - centre).square().sum(0).sqrt() < size / 4  # [*S]
        out = torch.zeros(count, 1, *(size,) * spatial_dims)
        out[:, 0, ball] = 0.5
        generator = torch.Generator().manual_seed(0)
        for i in range(count):
            corner = torch.randint(0, size - 3, (spatial_dims,), generator=generator).tolist()
            out[(i, 0, *(slice(c, c + 3) for c in corner))] = 1.0
        return out

    return images


@pytest.fixture(scope="session")
def train_full_batch():
    """train_full_batch(model, batch, task_name, steps, generator): the task's loss at every step of
    full-batch AdamW (lr 1e-3, weight decay 0.05, 10 warmup steps, cosine), as a fit check trains."""
    from medformer_core.engine.schedule import warmup_cosine

    def train(model: MultitaskModel, batch: dict, task_name: str, steps: int,
              generator: torch.Generator) -> list[float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        schedule = warmup_cosine(optimizer, 10, steps)
        losses = []
        for _ in range(steps):
            loss = model(batch, generator)[task_name].loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        return losses

    return train


@pytest.fixture(scope="session")
def unseen_accuracy(phantom_info, phantom_batch):
    """unseen_accuracy(task_name, spatial_dims, metric="accuracy") -> the task's `metric` on 64
    phantoms the model never saw, after 80 steps of the `tiny` preset as users get it (AdamW with the
    engine's warm-up and cosine schedule) on fresh batches of 32 of 512 other phantoms (28^2 or 16^3)."""
    batch_size, steps, pool, held_out = 32, 80, 512, 64

    def accuracy(task_name: str, spatial_dims: int, metric: str = "accuracy") -> float:
        info = phantom_info(spatial_dims, size={2: 28, 3: 16}[spatial_dims], count=pool + held_out)
        data = phantom_batch(info, count=pool + held_out)

        def rows(start: int) -> dict:
            return {"image": data["image"][start:start + batch_size], "label": data["label"][start:start + batch_size],
                    "dataset": info.name}

        torch.manual_seed(0)
        model = build_model("tiny", [info], [plugins.registries().tasks.get(task_name)])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        schedule = warmup_cosine(optimizer, warmup_steps=10, total_steps=steps)
        generator = torch.Generator().manual_seed(0)
        for step in range(steps):
            loss = model(rows(step * batch_size % pool), generator)[task_name].loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            scores = [model(rows(start), generator)[task_name].metrics[metric]
                      for start in range(pool, pool + held_out, batch_size)]
        return sum(scores) / len(scores)

    return accuracy


# -- MedMNIST files ----------------------------------------------------------------------------------


@pytest.fixture
def real_root() -> Path:
    """The folder of the shared real MedMNIST files; skips the test when they are absent."""
    root = Path(os.environ.get("MEDFORMER_DATA_ROOT") or REPO_ROOT.parent / "shared" / "data" / "medmnist")
    if not (root / "retinamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found in {root} "
                    "(set MEDFORMER_DATA_ROOT to the folder of the official .npz files)")
    return root


@pytest.fixture(scope="session")
def fake_arrays():
    """fake_arrays(name, seed=0, counts=None): arrays in the official layout of registered `name`
    (e.g. chestmnist, adrenalmnist3d_64), every class present."""

    def arrays(name: str, seed: int = 0, counts: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        flag, _, size = name.partition("_")
        variant = Variant(flag, int(size or 28))
        rng = np.random.default_rng(seed)
        found = {}
        for split in SPLITS:
            n = (counts or MEDMNIST_COUNTS)[split]
            found[f"{split}_images"] = rng.integers(0, 256, (n,) + sample_shape(variant), dtype=np.uint8)
            columns = label_columns(variant)
            high = 2 if columns > 1 else len(variant.meta["label"])
            labels = rng.integers(0, high, (n, columns))
            labels[: min(n, high), 0] = np.arange(min(n, high))
            found[f"{split}_labels"] = labels.astype(np.uint8)
        return found

    return arrays


@pytest.fixture(scope="session")
def write_npz(fake_arrays):
    """write_npz(root, name, compressed=True, **changes): a tiny `name.npz` in `root`; `changes`
    replace arrays, or drop them when None."""

    def write(root: Path, name: str, compressed: bool = True, **changes) -> Path:
        arrays = fake_arrays(name)
        for key, value in changes.items():
            if value is None:
                arrays.pop(key)
            else:
                arrays[key] = value
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{name}.npz"
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
        return path

    return write
