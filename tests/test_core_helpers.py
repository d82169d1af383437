"""The small shared helpers: name lookup with suggestions, key=value options, atomic writes."""

from dataclasses import dataclass
from typing import Literal

import pytest

from medformer_core.api.errors import UnknownNameError, UsageError
from medformer_core.api.files import atomic_write
from medformer_core.api.lookup import lookup, unknown_name
from medformer_core.api.options import parse_options, split_pairs


def test_lookup_suggests_close_names_or_lists_them():
    assert lookup({"tiny": 1, "small": 2}, "small", "preset") == 2
    with pytest.raises(UnknownNameError, match=r"^unknown preset 'tinny'; did you mean 'tiny'\?$"):
        lookup({"tiny": 1, "small": 2}, "tinny", "preset")
    error = unknown_name("unknown preset 'huge'", "huge", ["tiny", "small"])
    assert str(error) == "unknown preset 'huge' (choose one of: tiny, small)"
    assert unknown_name("task 'x' has no option 'y'", "y", []).hint == "there are none"


@dataclass(frozen=True)
class Example:
    root: str
    size: int | None = None
    fit: Literal["pad", "crop"] = "pad"
    window: tuple[float, float] = (0.0, 1.0)
    channels: Literal["auto"] | int = "auto"
    flag: bool = False


def test_options_convert_to_the_field_types():
    pairs = split_pairs("size=8,fit=crop,window=-1:2.5,channels=3,flag=yes", "example", "size=8")
    assert parse_options(Example, pairs, "example") == {"size": 8, "fit": "crop", "window": (-1.0, 2.5),
                                                        "channels": 3, "flag": True}
    assert parse_options(Example, {"size": "none", "channels": "auto"}, "example") == {"size": None, "channels": "auto"}
    assert split_pairs(["a=1", "b = x"], "--opt", "--opt a=1") == {"a": "1", "b": "x"}


@pytest.mark.parametrize("values, message", [
    ({"sise": "8"}, "example: unknown setting 'sise'; did you mean 'size'?"),
    ({"root": "x"}, "example: unknown setting 'root'"),
    ({"size": "big"}, "example: bad setting (size must be an integer, got 'big')"),
    ({"fit": "squash"}, "example: bad setting (fit must be one of pad, crop, got 'squash')"),
    ({"window": "3"}, "example: bad setting (window must be A:B, each a number, got '3')"),
    ({"channels": "many"}, "example: bad setting (channels must be auto or an integer, got 'many')"),
    ({"flag": "maybe"}, "example: bad setting (flag must be true or false, got 'maybe')"),
])
def test_bad_options_are_one_line_errors(values, message):
    with pytest.raises(UsageError) as info:
        parse_options(Example, values, "example")
    assert str(info.value).startswith(message)


def test_an_item_without_a_value_is_an_error():
    with pytest.raises(UsageError, match=r"--opt: 'depth' is not KEY=VALUE \(e.g. --opt depth=2\)"):
        split_pairs(["depth"], "--opt", "--opt depth=2")


def test_atomic_write_replaces_files_and_folders_or_leaves_them(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target) as temp:
        temp.write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as temp:
            temp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    folder = tmp_path / "folder"
    for text in ("old", "new"):
        with atomic_write(folder) as temp:
            temp.mkdir()
            (temp / "a").write_text(text)
    assert (folder / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.txt"]
