"""Task options: values (or their text, as `--task-option` and config files give them) are checked
and converted to the types of the task's Options fields; every mistake is one UsageError."""

from dataclasses import dataclass
from typing import Literal

import pytest

from medformer_core.api.errors import UsageError
from medformer_core.api.interfaces import PretextTask


@dataclass(frozen=True)
class BinsOptions:
    bins: int = 8
    scale: float = 1.0
    center: bool = True
    label: str = "x"
    window: tuple[int, int] = (0, 10)
    mode: Literal["sum", "mean"] = "mean"

    def __post_init__(self):
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")


class Bins(PretextTask):
    name = "bins"
    Options = BinsOptions


def test_text_values_convert_to_the_field_types():
    task = Bins().with_options(bins="3", scale="2", center="false", label="y", window="1:5", mode="sum")
    assert task.options == BinsOptions(bins=3, scale=2.0, center=False, label="y", window=(1, 5), mode="sum")
    assert isinstance(task.options.scale, float)


def test_typed_values_convert_too_and_others_keep_their_values():
    tuned = Bins().with_options(weight=2, bins=4).with_options(scale=3, window=[2, 4])  # TOML gives ints and lists
    assert tuned.weight == 2.0
    assert tuned.options == BinsOptions(bins=4, scale=3.0, window=(2, 4))
    assert Bins().options == BinsOptions()


@pytest.mark.parametrize("options, message", [
    ({"bins": "2.5"}, "task 'bins': option 'bins' must be an integer, got '2.5'"),
    ({"bins": "abc"}, "task 'bins': option 'bins' must be an integer, got 'abc'"),
    ({"bins": 2.5}, "task 'bins': option 'bins' must be an integer, got '2.5'"),
    ({"scale": "fast"}, "task 'bins': option 'scale' must be a number, got 'fast'"),
    ({"center": "maybe"}, "task 'bins': option 'center' must be true or false, got 'maybe'"),
    ({"window": "1"}, "task 'bins': option 'window' must be A:B, each an integer, got '1'"),
    ({"mode": "max"}, "task 'bins': option 'mode' must be one of sum, mean, got 'max'"),
    ({"bins": "1"}, "task 'bins': bins must be >= 2, got 1"),
    ({"bin": "3"}, "task 'bins' has no option 'bin'; did you mean 'bins'?"),
])
def test_bad_options_are_one_line_errors_naming_task_option_and_value(options, message):
    with pytest.raises(UsageError) as error:
        Bins().with_options(**options)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_wrong_type_names_the_default_and_where_to_see_the_options():
    with pytest.raises(UsageError) as error:
        Bins().with_options(bins="2.5")
    assert error.value.hint == "the default is 8; see the options with `medformer plugins show bins`"


def test_a_task_without_options_says_so():
    class Plain(PretextTask):
        name = "plain"

    with pytest.raises(UsageError, match=r"task 'plain' has no option 'bins' \(there are none\)"):
        Plain().with_options(bins="3")
