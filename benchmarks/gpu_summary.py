"""Write summary.md for a GPU check: every kernel target, met or missed, and the card it ran on.

    python benchmarks/gpu_summary.py OUT_DIR        # reads what scripts/gpu_check.sh left in OUT_DIR

Reads (each optional; a missing file makes its targets "not measured"): steps.tsv (each step's exit
status and seconds), gpu_tests.xml (pytest JUnit), compile_report.json, attention.json,
patch_embed.json, train_step.json. Speedups are forward+backward, against the rows the targets name:
torch SDPA (flash) for attention; nn.Conv (3D shapes), reshape+linear+add and embed-all-then-gather
(keep) for patch embedding.
"""

import json
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

SDPA_FLASH = "torch SDPA (flash)"
FORWARD_SHAPE = "B=4 H=12 N=4096 d=64"


@dataclass
class Target:
    name: str
    goal: str
    value: str = "not measured"
    met: bool | None = None  # None: not measured

    @property
    def status(self) -> str:
        return {True: "met", False: "missed", None: "not measured"}[self.met]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _speedups(bench: dict, baseline: str, keep: bool | None = None, three_d: bool | None = None) -> dict:
    """{shape: baseline fwd+bwd ms / medformer fwd+bwd ms} for the shapes where `baseline` ran."""
    ours = {row["shape"]: row for row in bench["rows"] if row["group"] == "medformer"}
    result = {}
    for row in bench["rows"]:
        if row["impl"] != baseline and row["group"] != baseline:
            continue
        shape = row["shape"]
        if keep is not None and ("keep" in shape) != keep:
            continue
        if three_d is not None and (len(row["params"].get("spatial", ())) == 3) != three_d:
            continue
        if shape in ours:
            result[shape] = row["fwdbwd_ms"] / ours[shape]["fwdbwd_ms"]
    return result


def _at_least(name: str, goal: float, values: dict, what: str = "min") -> Target:
    target = Target(name, f">= {goal:g}x")
    if values:
        if what == "geomean":
            value = math.exp(sum(math.log(v) for v in values.values()) / len(values))
        else:
            value = min(values.values())
        worst = "" if what == "geomean" else f" (worst: {min(values, key=values.get)})"
        target.value, target.met = f"{value:.2f}x{worst}", value >= goal
    return target


def attention_targets(bench: dict | None) -> list[Target]:
    names = [("attention >= 1.0x SDPA flash on every shape", 1.0, "min"),
             ("attention geometric mean vs SDPA flash", 1.3, "geomean")]
    if bench is None:
        return [Target(name, f">= {goal:g}x") for name, goal, _ in names] + \
            [Target("attention forward TFLOP/s at (4,12,4096,64)", ">= 450")]
    flash = _speedups(bench, SDPA_FLASH)
    targets = [_at_least(name, goal, flash, what) for name, goal, what in names]
    forward = Target("attention forward TFLOP/s at (4,12,4096,64)", ">= 450")
    rows = [r for r in bench["rows"] if r["group"] == "medformer" and r["shape"] == FORWARD_SHAPE]
    if rows:
        forward.value, forward.met = f"{rows[0]['fwd_tflops']:.0f}", rows[0]["fwd_tflops"] >= 450
    return targets + [forward]


def patch_targets(bench: dict | None) -> list[Target]:
    specs = [("patch embedding vs nn.Conv3d", 10.0, "nn.Conv", False, True),
             ("patch embedding vs reshape+linear+add", 1.3, "reshape+linear+add", False, None),
             ("patch embedding vs embed-all-then-gather (keep 25%)", 3.0, "embed-all-then-gather", True, None)]
    if bench is None:
        return [Target(name, f">= {goal:g}x") for name, goal, *_ in specs]
    return [_at_least(name, goal, _speedups(bench, baseline, keep, three_d))
            for name, goal, baseline, keep, three_d in specs]


def train_target(result: dict | None) -> Target:
    target = Target("`small` train step on 64^3, triton vs torch", "> 1.0x")
    if result and "speedup" in result:
        step = result["step_s"]
        target.value = f"{result['speedup']:.2f}x ({step['torch'] * 1e3:.0f} ms -> {step['triton'] * 1e3:.0f} ms)"
        target.met = result["speedup"] > 1.0
    return target


def compile_target(report: dict | None) -> Target:
    target = Target("no shipped config spills (sm_90 compile report)", "0 spilling")
    if report:
        bad = [r for r in report["results"] if not r["ok"]]
        target.value = f"{len(bad)} of {len(report['results'])} spill or fail"
        target.met = not bad
    return target


def tests_line(path: Path) -> str:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "GPU tests: no JUnit report (the step did not finish)"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return (f"GPU tests: {passed} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped ({float(suite.get('time', 0)):.0f} s)")


def card_name(out: Path) -> str:
    for name in ("attention.json", "patch_embed.json"):
        data = _load(out / name)
        if data:
            return data["meta"]["device_name"]
    data = _load(out / "train_step.json")
    return data["device_name"] if data else "unknown"


def summary_markdown(out: Path) -> str:
    targets = [*attention_targets(_load(out / "attention.json")), *patch_targets(_load(out / "patch_embed.json")),
               train_target(_load(out / "train_step.json")), compile_target(_load(out / "compile_report.json"))]
    lines = [f"# GPU check on {card_name(out)}", "", tests_line(out / "gpu_tests.xml"), "",
             "| target | goal | measured | status |", "| --- | --- | --- | --- |"]
    lines += [f"| {t.name} | {t.goal} | {t.value} | {t.status} |" for t in targets]
    steps = out / "steps.tsv"
    if steps.is_file():
        lines += ["", "| step | exit | seconds |", "| --- | ---: | ---: |"]
        lines += [f"| {' | '.join(line.split(chr(9)))} |" for line in steps.read_text().splitlines() if line]
    met = sum(t.met is True for t in targets)
    lines += ["", f"{met} of {len(targets)} targets met."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python benchmarks/gpu_summary.py OUT_DIR (the folder scripts/gpu_check.sh wrote)",
              file=sys.stderr)
        return 2
    out = Path(args[0])
    text = summary_markdown(out)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
