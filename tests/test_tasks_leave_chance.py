"""With the defaults, the pretext classifiers leave chance in a short run: the `tiny` preset as
users get it, trained for 80 steps on fresh batches of the embedded phantoms, then scored on
phantoms it never saw (so memorising cannot pass).

Chance is what a head scores that learned nothing from the image: 1/K for a K-way classifier. The
phantoms have a canonical anatomy (plugins/phantoms.py), so rotation, jigsaw and slice position are
learnable on them. The label head is checked on real images (tests/test_model_fits.py,
tests/test_features_separate_images.py) and the guide's `flip` task in tests/test_docs.py.
"""

import pytest

# (task, spatial dims, metric, chance accuracy)
CASES = [
    ("rotation", 2, "accuracy", 1 / 4),
    ("rotation", 3, "accuracy", 1 / 24),
    ("jigsaw", 2, "accuracy", 1 / 100),
    ("slice-position", 3, "axis_accuracy", 1 / 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("task_name", "spatial_dims", "metric", "chance"), CASES)
def test_the_default_task_leaves_chance_on_unseen_phantoms(task_name, spatial_dims, metric, chance, unseen_accuracy):
    accuracy = unseen_accuracy(task_name, spatial_dims, metric)
    assert accuracy > chance + 0.2 * (1 - chance), (accuracy, chance)
