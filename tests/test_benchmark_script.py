"""benchmarks/train_step.py runs end to end against diffusers and prints a well-formed table (the
speed numbers themselves come from real runs recorded in benchmarks/RESULTS.md, not from here)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--input-size", "8", "--batch", "2", "--device", "cpu", "--warmup", "1",
           "--iters", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_reference_rows_time_the_same_function():
    out = run("--model", "mmdit-tiny/2", "--levers", "fp32", "--reference", "diffusers", "--text-len", "4",
              "--text-dim", "16")
    assert out.returncode == 0, out.stderr[-2000:]
    difference = float(re.search(r"relative max difference ours vs diffusers: (\S+)", out.stdout).group(1))
    assert difference < 1e-5
    rows = [line for line in out.stdout.splitlines() if line.startswith("| fp32 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["ours", "diffusers"]
    ratio = float(rows[0].split("|")[-2].strip().rstrip("x"))
    ours, theirs = (float(r.split("|")[3]) for r in rows)
    assert ratio == pytest.approx(ours / theirs, rel=0.02)


def test_architecture_without_a_diffusers_counterpart_is_refused():
    out = run("--model", "mdt-tiny/2", "--levers", "fp32", "--reference", "diffusers")
    assert out.returncode != 0 and "mdt has no diffusers counterpart" in out.stderr


SAMPLE_SCRIPT = SCRIPT.parent / "sample_speed.py"


def test_sample_speed_checks_parity_with_dit_pipeline_then_prints_consistent_rows():
    cmd = [sys.executable, str(SAMPLE_SCRIPT), "--preset", "tiny", "--image-size", "16", "--batch-sizes", "1,2",
           "--steps", "3", "--reps", "2", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Wrote diffusers DiTPipeline" in out.stdout
    difference = float(re.search(r"max \|image diff\| (\S+)\.", out.stdout).group(1))
    assert difference < 1e-4  # the two sides compute the same images before they are timed
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if re.match(r"\| 3 \| \d", line)]
    assert [int(r[1]) for r in rows] == [1, 2]
    for r in rows:
        ours, theirs = float(r[2]), float(r[3])
        assert ours > 0 and theirs > 0
        # the ratio is of medians of per-call times, images/s are batch / median time: the same quotient
        assert float(r[4].split("x")[0]) == pytest.approx(ours / theirs, rel=0.02)
        assert float(r[5]) == pytest.approx(int(r[1]) / ours, rel=0.02)  # s/call = batch / images/s


def test_overhead_prints_three_loops_with_consistent_ratios():
    script = SCRIPT.parent / "overhead.py"
    config = SCRIPT.parents[1] / "configs" / "quickstart.yaml"
    cmd = [sys.executable, str(script), str(config), "data.image_size=16", "model.depth=2", "model.hidden_size=32",
           "train.batch_size=4", "--blocks", "3", "--block", "2", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and "steps/s" not in line]
    assert [r[0].strip()[:12] for r in rows] == ["bare PyTorch", "`ldmkit trai", "`ldmkit trai"]
    rates = [float(r[1]) for r in rows]
    assert all(rate > 0 for rate in rates)
    for r in rows[1:]:
        median, spread = r[2].split(" (")
        lo, hi = (float(v) for v in spread.rstrip(") ").split("-"))
        assert lo <= float(median) <= hi  # the median of the per-block ratios lies within their range
