"""The `medformer` command line (Typer)."""
