"""`medformer predict`: segment whole scans with a segmentation fine-tune."""

from pathlib import Path

import typer

from medformer_cli.console import err, out


def predict(
    run: Path = typer.Argument(..., help="A `medformer finetune --task segmentation` run directory."),
    inputs: Path = typer.Option(..., "--input", help="A scan, or a directory of NIfTI volumes or pictures."),
    out_dir: Path = typer.Option(..., "--out", help="Where the masks and their overlay previews go."),
    overlap: float = typer.Option(0.5, min=0.0, max=0.95, help="Overlap of neighbouring windows (fraction)."),
    batch_size: int = typer.Option(32, min=1, help="Windows per forward pass."),
    data_root: Path = typer.Option(None, help="Where the run's dataset lives, if it moved."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
):
    """Segment every scan of --input by a sliding window (Gaussian blending); writes one mask per
    scan (NIfTI with the input's affine and header; PNG for pictures) and a PNG overlay preview."""
    from medformer_core.downstream.predict import predict_run

    report = predict_run(run, inputs, out_dir, overlap, device, batch_size, str(data_root) if data_root else None)
    if report.padded:
        err.print(f"Padded {len(report.padded)} scan(s) smaller than the model's window with zeros "
                  f"(the mask is cut back to the scan): {', '.join(report.padded)}", soft_wrap=True)
    if report.non_finite:
        err.print(f"warning: NaN or infinite voxels were left out of the intensity scaling and filled with the "
                  f"lowest intensity: {', '.join(report.non_finite)}", soft_wrap=True)
    out.print(f"Wrote {len(report.written)} mask(s) and overlay previews to {out_dir}")
