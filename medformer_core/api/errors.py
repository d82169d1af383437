"""User-facing errors: each prints as one line with a hint, and exits non-zero without a traceback."""


class MedformerError(Exception):
    """An error the user can fix; `hint` says how. The CLI prints it as one line."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MedformerError):
    """A bad name, option or combination given on the command line or in a config."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A plugin, dataset, adapter or task name that no loaded plugin registered."""


class PluginConflictError(MedformerError):
    """Two plugins registered the same name in the same registry."""


class DataError(MedformerError):
    """A data file that is missing, corrupt or of the wrong layout."""


class CheckpointError(MedformerError):
    """A checkpoint or weights file that cannot be loaded."""


class TrainingError(MedformerError):
    """Training cannot go on (a non-finite loss); the last good checkpoint stays valid."""


class RunStopped(MedformerError):
    """SIGINT or SIGTERM stopped a run after it checkpointed; `--resume` continues it."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint saved", hint="continue with --resume")
        self.signal_name = signal_name
        self.step = step
        self.exit_code = 130 if signal_name == "SIGINT" else 143
