"""The `medformer` app: sub-commands from the core and from plugins' `register_commands`."""

import sys

import typer
from rich.markup import escape

from medformer_cli import bench, datasets_cmd, plugins_cmd, predict_cmd, train_cmd
from medformer_cli.console import err
from medformer_core.api.errors import MedformerError
from medformer_core.api.plugins import medformer_version, plugin_manager


def _version(value: bool):
    if value:
        print(f"medformer {medformer_version()}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """The full app: core sub-commands, then whatever plugins add."""
    app = typer.Typer(
        help="medformer: multitask self-supervised pretraining for 2D and 3D medical images.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ):
        """medformer: multitask self-supervised pretraining for 2D and 3D medical images."""

    app.add_typer(plugins_cmd.app, name="plugins")
    app.add_typer(datasets_cmd.app, name="datasets")
    app.add_typer(bench.app, name="bench")
    app.command("train")(train_cmd.train)
    app.command("finetune")(train_cmd.finetune)
    app.command("eval")(train_cmd.evaluate)
    app.command("predict")(predict_cmd.predict)
    pm, _, _ = plugin_manager()
    pm.hook.register_commands(app=app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user error prints one line and exits non-zero, no traceback."""
    try:
        build_app()(args=argv, prog_name="medformer")
    except MedformerError as exc:
        err.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
