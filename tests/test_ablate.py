"""Ablations over seeds: the statistics against independent numpy/scipy computations, the verdict rule,
resuming, the parallel runner and a tiny end-to-end ablation through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from ldmkit import ablate
from ldmkit.ablate import load_spec, run_ablation, summarize
from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.eval.stats import binomial_se, mean_se, paired_difference, t_quantile, verdict

QUICKSTART = str(Path("configs/quickstart.yaml").resolve())
TINY = ["data.image_size=16", "data.shapes.colours=[red,green]", "model.name=dit-tiny/4", "train.batch_size=8",
        "train.steps=2", "train.warmup_steps=1", "train.sample_every=0", "train.threads=1", "sample.steps=2",
        "sample.grid_rows=1", "eval.shapes_per_class=1"]


def _write(tmp_path, name="lr", **spec):
    spec = {"description": "two learning rates", "base": QUICKSTART, "overrides": TINY,
            "variants": {"low": ["train.lr=1e-4"], "high": ["train.lr=1e-3"]}, "evaluate": ["shapes"], **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- statistics


def test_mean_se_and_binomial_se_match_numpy():
    x = [0.61, 0.55, 0.72, 0.58]
    s = mean_se(x)
    assert s["mean"] == pytest.approx(np.mean(x)) and s["k"] == 4
    assert s["se"] == pytest.approx(np.std(x, ddof=1) / math.sqrt(4))
    assert s["se"] == pytest.approx(sps.sem(x))
    assert mean_se([0.3])["se"] is None
    # binomial se = the standard deviation of the 0/1 outcomes (ddof 0) / sqrt(n)
    outcomes = np.array([1] * 37 + [0] * 63)
    assert binomial_se(0.37, 100) == pytest.approx(outcomes.std() / math.sqrt(100))
    assert binomial_se(0.0, 10) == 0.0
    for bad in ((1.2, 10), (0.5, 0), (float("nan"), 5), (0.5, 2.5)):
        with pytest.raises(ValueError):
            binomial_se(*bad)
    with pytest.raises(ValueError):
        mean_se([1.0, float("inf")])


def test_paired_interval_matches_scipy():
    base = {0: 0.50, 1: 0.47, 2: 0.55, 3: 0.52, 4: 0.49}
    arm = {0: 0.58, 1: 0.50, 2: 0.66, 3: 0.57, 4: 0.55, 9: 0.99}  # seed 9 has no pair: ignored
    d = np.array([arm[s] - base[s] for s in range(5)])
    r = paired_difference(arm, base)
    assert r["seeds"] == [0, 1, 2, 3, 4] and r["k"] == 5 and r["df"] == 4
    assert r["diff"] == pytest.approx(d.mean())
    lo, hi = sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d))
    assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    # the interval excludes 0 exactly when the paired t-test rejects at 5%
    p = sps.ttest_rel([arm[s] for s in range(5)], [base[s] for s in range(5)]).pvalue
    assert (r["lo"] > 0 or r["hi"] < 0) == (p < 0.05)
    assert t_quantile(4) == pytest.approx(sps.t.ppf(0.975, 4))
    one = paired_difference({0: 0.6}, {0: 0.5})
    assert one["diff"] == pytest.approx(0.1) and one["lo"] is None and one["k"] == 1
    assert paired_difference({0: 1.0}, {1: 1.0})["k"] == 0


def test_verdict_rule():
    assert verdict(0.01, 0.2, "higher") == "reproduced"
    assert verdict(0.01, 0.2, "lower") == "opposite"
    assert verdict(-0.2, -0.01, "lower") == "reproduced"
    assert verdict(-0.2, -0.01, "higher") == "opposite"
    assert verdict(-0.1, 0.2, "higher") == "within noise"
    assert verdict(0.0, 0.2, "higher") == "within noise"  # touching 0 counts as containing it
    assert verdict(0.1, 0.2, None) == "—"
    assert verdict(None, None, "higher") == "n/a"
    with pytest.raises(ValueError):
        verdict(0.1, 0.2, "bigger")


def test_summary_of_made_up_results_matches_independent_computation(tmp_path):
    spec = load_spec(_write(tmp_path, seeds=[0, 1, 2], baseline="low",
                            claim={"id": "X", "text": "a higher lr follows classes better",
                                   "expect": {"colour": "higher", "loss": "lower"}}))
    rng = np.random.default_rng(0)
    base_c, arm_c = rng.uniform(0.3, 0.5, 3), rng.uniform(0.6, 0.8, 3)
    loss_b, loss_a = rng.uniform(0.1, 0.2, 3), rng.uniform(0.1, 0.2, 3)
    rows = [{"variant": "low", "seed": s, "overrides": [], "colour": base_c[s], "loss": loss_b[s], "n": 36}
            for s in range(3)] + \
           [{"variant": "high", "seed": s, "overrides": [], "colour": arm_c[s], "loss": loss_a[s], "n": 36}
            for s in range(3)]
    summary = summarize(spec, rows)
    high = summary["arms"]["high"]["colour"]
    assert high["mean"] == pytest.approx(arm_c.mean()) and high["se"] == pytest.approx(sps.sem(arm_c))
    assert high["binomial_se"][1] == pytest.approx(math.sqrt(arm_c[1] * (1 - arm_c[1]) / 36))
    assert "binomial_se" not in summary["arms"]["high"]["loss"]  # a loss is not a proportion
    c = summary["comparisons"]["high"]["colour"]
    d = arm_c - base_c
    lo, hi = sps.t.interval(0.95, 2, loc=d.mean(), scale=sps.sem(d))
    assert (c["lo"], c["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert c["expected"] == "higher" and c["verdict"] == ("reproduced" if lo > 0 else "within noise")
    assert summary["comparisons"]["high"]["loss"]["expected"] == "lower"
    assert "low" not in summary["comparisons"]  # the baseline is not compared with itself
    text = ablate.format_results(spec, rows, summary)
    assert "**Claim X**" in text and f"| high | low | colour | higher | {100 * d.mean():+.1f}% |" in text
    assert f"{100 * arm_c.mean():.1f}% ± {100 * sps.sem(arm_c):.1f}%" in text


def test_spec_checks(tmp_path):
    spec = load_spec(_write(tmp_path))
    assert spec["seeds"] == [0] and spec["baseline"] == "low" and spec["claim"] is None  # old files' defaults
    for bad, match in [({"seeds": []}, "seeds"), ({"seeds": [0, 0]}, "repeat"), ({"seeds": [-1]}, "non-negative"),
                       ({"baseline": "mid"}, "baseline"), ({"claim": {"expect": {"colour": "up"}}}, "higher"),
                       ({"claim": {"expect": {"color": "higher"}}}, "unknown metric"),
                       ({"claim": {"expect": {"colour": "higher"}, "arms": ["low"]}}, "non-baseline"),
                       ({"gpu": "yes"}, "gpu"), ({"estimate_minutes": -3}, "estimate_minutes"),
                       ({"overrides": [*TINY, "seed=3"]}, "seeds"), ({"evaluate": ["flip"]}, "text model"),
                       ({"colour": 1}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            load_spec(_write(tmp_path, name="bad", **bad))
    per_arm = load_spec(_write(tmp_path, name="arm", claim={"expect": {"high": {"colour": "higher"}}}))
    assert per_arm["claim"]["expect_by_arm"] == {"high": {"colour": "higher"}}
    # an arm may be compared with another arm than the baseline
    three = {"low": [], "mid": ["train.lr=5e-4"], "high": ["train.lr=1e-3"]}
    spec = load_spec(_write(tmp_path, name="than", variants=three, seeds=[0, 1],
                            claim={"expect": {"high": {"than": "mid", "colour": "higher"}, "mid": {"colour": "higher"}}}))
    rows = [{"variant": a, "seed": s, "colour": v + 0.01 * s, "n": 10}
            for a, v in (("low", 0.2), ("mid", 0.4), ("high", 0.5)) for s in (0, 1)]
    comps = summarize(spec, rows)["comparisons"]
    assert comps["high"]["colour"]["reference"] == "mid" and comps["high"]["colour"]["diff"] == pytest.approx(0.1)
    assert comps["mid"]["colour"]["reference"] == "low" and comps["mid"]["colour"]["diff"] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="than"):
        load_spec(_write(tmp_path, name="bad", variants=three, claim={"expect": {"high": {"than": "top"}}}))


# ---------------------------------------------------------------------------------------------- running


def _fake_unit(calls):
    def run_unit(spec, out, unit, extra=(), device=None, disentangle_num=64, progress=True):
        calls.append((unit.key, device))
        run_dir = out / unit.arm / f"seed{unit.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        row = {"variant": unit.arm, "seed": unit.seed, "overrides": spec["variants"][unit.arm], "run_dir": str(run_dir),
               "colour": 0.5 + 0.1 * (unit.arm == "high") + 0.01 * unit.seed, "n": 20}
        (run_dir / "result.json").write_text(json.dumps(row))
        return row
    return run_unit


def test_resume_with_seeds_runs_only_missing_units(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablate, "run_unit", _fake_unit(calls))
    path = _write(tmp_path, seeds=[0, 1], claim={"expect": {"colour": "higher"}})
    out = run_ablation(path, out=tmp_path / "out", progress=False, devices=["cpu"])
    assert [k for k, _ in calls] == ["low/seed0", "high/seed0", "low/seed1", "high/seed1"]  # seed-major
    assert all(d == "cpu" for _, d in calls)
    (out / "high" / "seed1" / "result.json").unlink()
    calls.clear()
    run_ablation(path, out=out, progress=False)
    assert [k for k, _ in calls] == ["high/seed1"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["results"]) == 4
    assert results["summary"]["comparisons"]["high"]["colour"]["diff"] == pytest.approx(0.1)
    assert results["summary"]["comparisons"]["high"]["colour"]["verdict"] == "reproduced"  # sd 0, diff > 0
    with pytest.raises(ConfigError, match="seeds"):
        run_ablation(path, ["seed=4"], out=out, progress=False)


def test_arms_that_differ_only_in_sampling_share_one_training(tmp_path):
    spec = load_spec(_write(tmp_path, variants={"small": ["sample.orig_size=[4,4]"], "large": ["sample.orig_size=[64,64]"],
                                                "other": ["train.lr=1e-4"]}, seeds=[3]))
    units = ablate.plan(spec, tmp_path / "out")
    assert [(u.arm, u.seed, u.source) for u in units] == [("small", 3, "small"), ("large", 3, "small"),
                                                          ("other", 3, "other")]
    assert ablate._needs(spec, units[1]) == ["small/seed3"]


def test_parallel_runner_runs_workers_in_subprocesses(tmp_path):
    """The --jobs path (worker processes, dependencies, logs, devices), one process at a time to keep the
    test light: a pre-training and a fine-tuning that starts from the same seed's pre-training."""
    path = _write(tmp_path, variants={"pre": [], "fine": ["init.from={run:pre}"]}, seeds=[1])
    spec = load_spec(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps({**spec, "extra_overrides": [], "disentangle_num": 8}))
    units = ablate.plan(spec, out)
    stopped = ablate._run_parallel(spec, out, units, [], ["cpu"], 1, 8)
    assert not stopped
    for u in units:
        row = json.loads((out / u.arm / f"seed{u.seed}" / "result.json").read_text())
        assert row["seed"] == u.seed and "colour" in row
        assert (out / "logs" / f"{u.arm}-seed{u.seed}.log").is_file()
    cfg = yaml.safe_load((out / "fine" / "seed1" / "config.yaml").read_text())
    assert cfg["seed"] == 1 and cfg["init"]["from"].endswith("pre/seed1") and cfg["train"]["device"] == "cpu"


def test_tiny_ablation_end_to_end_through_the_cli(tmp_path, capsys):
    path = _write(tmp_path, seeds=[0, 1], baseline="low", claim={"id": "T", "text": "lr", "expect": {"colour": "higher"}})
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Paired differences arm − reference (`low`" in printed and "| high | low | colour | higher |" in printed
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in results["results"]) == [("high", 0), ("high", 1), ("low", 0),
                                                                             ("low", 1)]
    assert all({"colour", "shape", "loss", "n"} <= set(r) for r in results["results"])
    assert results["summary"]["comparisons"]["high"]["colour"]["k"] == 2
    assert (out / "results.png").is_file()
    assert yaml.safe_load((out / "low" / "seed1" / "config.yaml").read_text())["seed"] == 1
    with pytest.raises(SystemExit):
        main(["ablate", str(path), "--out", str(out), "--jobs", "0"])
    assert main(["ablate", str(path), "--out", str(out), "--devices", "gpu7"]) == 2
    assert "ldmkit: error:" in capsys.readouterr().err


def test_parallel_runner_does_not_wait_for_a_unit_that_cannot_run(tmp_path, capsys):
    path = _write(tmp_path, variants={"pre": [], "fine": ["init.from={run:pre}"]}, seeds=[0])
    spec = load_spec(path)
    fine = [u for u in ablate.plan(spec, tmp_path / "out") if u.arm == "fine"]
    assert not ablate._run_parallel(spec, tmp_path / "out", fine, [], [], 2, 8)  # pre is neither done nor to run
    assert "cannot start fine/seed0" in capsys.readouterr().out
