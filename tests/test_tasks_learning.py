"""Each built-in task learns: over a short seeded run on phantoms its loss falls (a loss
comparison, never a timing).

Every step sees the same batches with the same views (the generator is re-seeded per step), so the
test checks that the task's gradients lower its own loss. Whether a view's target can be told
from the view is checked on hand-made cases in test_tasks_targets.py; phantoms are symmetric
under rotations and axis swaps, so rotation or slice axis could not be learned beyond memory.
"""

import pytest
import torch

from medformer_core.plugins import registries
from test_registry_smoke import phantom_batch, phantom_info, tiny_model

STEPS = 30
BUILT_IN = ["contrastive", "domain-adversarial", "jigsaw", "mae", "mae3d", "restoration", "rotation",
            "slice-position", "supervised"]


def run_loss(model, task: str, batches: list[dict]) -> torch.Tensor:
    """The task's summed loss over `batches` (the datasets it accepts), with fixed views."""
    generator = torch.Generator().manual_seed(0)
    accepted = [b for b in batches if task in [t.name for t in model.tasks_for(b["dataset"])]]
    return sum(model(batch, generator)[task].loss for batch in accepted)


@pytest.mark.parametrize("name", BUILT_IN)
def test_loss_falls_over_a_short_seeded_run(name):
    task = registries().tasks.get(name)
    if name == "domain-adversarial":  # alone, Adam makes any reversed gradient win over the classifier;
        task = task.with_options(coefficient=0.0)  # the reversal itself is tested in test_tasks_targets
    model = tiny_model([task], [phantom_info(2), phantom_info(3)])
    batches = [phantom_batch(info, count=8) for info in model.dataset_infos]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = run_loss(model, name, batches).item()
    for _ in range(STEPS):
        optimizer.zero_grad()
        run_loss(model, name, batches).backward()
        optimizer.step()
    with torch.no_grad():
        after = run_loss(model, name, batches).item()
    assert after < 0.8 * before, f"{name}: {before:.4f} -> {after:.4f}"
