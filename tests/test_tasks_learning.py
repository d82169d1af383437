"""Each registered task learns: over a short seeded run on phantoms its loss falls (a loss
comparison, never a timing).

Every step sees the same batches with the same views (the generator is re-seeded per step), so the
test checks that the task's gradients lower its own loss. Whether a view's target can be told
from the view is checked on hand-made cases in test_tasks_targets.py, and whether the
classification-type tasks leave chance on phantoms they never saw in test_tasks_leave_chance.py.
"""

import pytest
import torch

from medformer_core.api.plugins import registries

STEPS = 30
# Tasks that cannot show learning in this test, with the reason (none today).
EXCLUDED: dict[str, str] = {}
# Options a task needs here, with the reason: alone, Adam makes any reversed gradient win over the
# domain classifier (the reversal itself is tested in test_tasks_targets.py).
OPTIONS = {"domain-adversarial": {"coefficient": 0.0}}
TASKS = [pytest.param(name, marks=pytest.mark.skip(reason=EXCLUDED[name])) if name in EXCLUDED else name
         for name in registries().tasks.names()]


def run_loss(model, task: str, batches: list[dict]) -> torch.Tensor:
    """The task's summed loss over `batches` (the datasets it accepts), with fixed views."""
    generator = torch.Generator().manual_seed(0)
    accepted = [b for b in batches if task in [t.name for t in model.tasks_for(b["dataset"])]]
    return sum(model(batch, generator)[task].loss for batch in accepted)


@pytest.mark.parametrize("name", TASKS)
def test_loss_falls_over_a_short_seeded_run(name, tiny_model, phantom_info, phantom_batch):
    task = registries().tasks.get(name).with_options(**OPTIONS.get(name, {}))
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
