"""Shared test set-up: no installed third-party plugin may leak into the suite."""

import os
from pathlib import Path

os.environ["MEDFORMER_LOAD_PLUGINS"] = "none"

import pytest  # noqa: E402

from medformer_core import plugins  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins for one test (after it changes the environment or sys.path), and after it."""
    plugins.reset()
    yield monkeypatch
    plugins.reset()


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
