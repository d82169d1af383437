"""`medformer bench`: shape parsing, and tiny CPU runs of both commands through the Typer app (no timing asserts)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from medformer_cli.bench import app
from medformer_core.api.errors import UsageError
from medformer_kernels import bench


def test_parse_attention_shapes():
    assert bench.parse_attention_shapes("32x6x197x64, 8x6x64x4096x64") == [
        bench.AttentionShape(32, 6, 197, 197, 64), bench.AttentionShape(8, 6, 64, 4096, 64)]
    assert len(bench.parse_attention_shapes(bench.ATTENTION_SHAPES)) == 11


@pytest.mark.parametrize("text", ["32x6x197", "axbxcxd", "0x6x50x64", "", "1x1x1x1x1x1"])
def test_parse_attention_shapes_rejects(text):
    with pytest.raises(UsageError):
        bench.parse_attention_shapes(text)


def test_parse_patch_shapes():
    shapes = bench.parse_patch_shapes(bench.PATCH_SHAPES + ",2x3x16x24:8x4:32")
    assert shapes[0] == bench.PatchShape(8, 1, (64, 64, 64), (4, 4, 4), 384)
    assert shapes[0].n_patches == 4096 and shapes[0].k == 64
    assert shapes[-1] == bench.PatchShape(2, 3, (16, 24), (8, 4), 32)


@pytest.mark.parametrize("text", ["8x1x64x64x64:4", "8x1x30x30:4:384", "8x1x64:4:384", "8x1x64x64:4x4x4:384",
                                  "2x1x8x8:2:3x3"])
def test_parse_patch_shapes_rejects(text):
    with pytest.raises(UsageError):
        bench.parse_patch_shapes(text)


def test_time_ms_is_a_positive_median():
    assert bench.time_ms(lambda: torch.ones(8).sum(), torch.device("cpu"), budget_s=0.001) > 0


def _run(tmp_path, *args):
    out = tmp_path / "result.json"
    options = ["--device", "cpu", "--budget", "0.002", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_bench_attention_on_cpu(tmp_path):
    output, data = _run(tmp_path, "attention", "--shapes", "1x2x8x16,1x2x4x9x16", "--dtype", "fp32")
    assert "TFLOP/s" in output and "geometric mean" in output
    assert any("the Triton kernels need a GPU" in note for note in data["notes"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["dtype"] == "float32"
    assert {row["shape"] for row in data["rows"]} == {"B=1 H=2 N=8 d=16", "B=1 H=2 Nq=4 Nk=9 d=16"}
    ours = [row for row in data["rows"] if row["group"] == "medformer"]
    assert len(ours) == 2 and all(row["fwd_speedup"] == 1.0 for row in ours)
    assert {"torch SDPA (flash)", "torch SDPA (math)", "naive"} <= set(data["geomeans"])
    assert all(row["fwd_ms"] > 0 and row["fwdbwd_tflops"] > 0 for row in data["rows"])


def test_autotune_option_is_set_for_the_run_only(tmp_path, monkeypatch):
    from medformer_kernels import configs

    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    seen = []
    real = bench.bench_attention

    def spy(*args, **kwargs):
        seen.append(configs.autotune_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_attention", spy)
    _run(tmp_path, "attention", "--shapes", "1x1x4x16", "--autotune")
    assert seen == [True] and not configs.autotune_enabled()


def test_threads_option_is_restored(tmp_path):
    before = torch.get_num_threads()
    _run(tmp_path, "attention", "--shapes", "1x1x4x16")
    assert torch.get_num_threads() == before


def test_bench_patch_embed_on_cpu(tmp_path):
    output, data = _run(tmp_path, "patch-embed", "--shapes", "1x1x8x8x8:4:16,1x3x8x8:4:16", "--keep", "0.5")
    assert "GB/s" in output
    assert len(data["summary"]) == 4  # each shape, with and without keep
    assert set(data["geomeans"]) == {"nn.Conv", "reshape+linear+add", "embed-all-then-gather"}
    kept = {row["shape"]: row["params"]["n_tokens"] for row in data["rows"] if "keep" in row["shape"]}
    assert sorted(kept.values()) == [2, 4]  # half of 4 and of 8 patches
    assert all(row["fwd_gbps"] > 0 for row in data["rows"])


@pytest.mark.parametrize("args", [["patch-embed", "--keep", "1.5"], ["attention", "--dtype", "fp8"],
                                  ["attention", "--threads", "0"],
                                  ["attention", "--shapes", "1x2x3"], ["attention", "--device", "tpu"]])
def test_bench_usage_errors(args):
    result = CliRunner().invoke(app, [*args, "--device", "cpu"] if "--device" not in args else args)
    assert isinstance(result.exception, UsageError)
