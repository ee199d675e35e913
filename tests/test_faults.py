"""Faults on purpose, through the command line: divergence, damaged checkpoints, early kills, changed
seeds, bad input of every kind. Each case asserts the outcome a user sees (exit status, one line naming the
key, flag or path, no traceback) and what is kept on disk (docs/training.md, "What survives what")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.train.checkpoint import (MANIFEST, list_checkpoints, load_train_state, newest_intact_checkpoint,
                                     verify_checkpoint)
from ldmkit.train.guard import SPIKE_MIN_HISTORY, SPIKE_WINDOW, DivergenceGuard
from ldmkit.train.trainer import Trainer, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "data.image_size=16", "data.shapes.colours=[red,green,blue]", "model.name=dit-tiny/4",
    "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
    "train.checkpoint_every=100", "train.sample_every=0", "train.keep_checkpoints=0",
    "train.threads=1", "eval.shapes_at_end=false", "sample.steps=2", "sample.grid_rows=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(capsys, *args):
    """Run ``ldmkit ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err, *needles, status_line="ldmkit: error:"):
    """stderr ends with exactly one error line that names every needle, and shows no traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith(status_line)]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def weights(run, step, name="model.safetensors"):
    return load_file(str(Path(run) / "checkpoints" / f"step_{step:07d}" / name))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps with a checkpoint every 2."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(None, [*BASE, "train.steps=8", "train.checkpoint_every=2", f"run.dir={run}"]), progress=False)
    return run


# ----------------------------------------------------------------------------------------------
# 1. Divergence: bad weights are never kept, good ones never deleted
# ----------------------------------------------------------------------------------------------


def test_a_learning_rate_typo_stops_at_the_first_update_and_the_run_can_start_again(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *BASE, "train.lr=1e3", "train.steps=50", "train.checkpoint_every=1",
                     f"run.dir={run}", "--no-progress")
    line = assert_one_line_error(err, "diverged at step 1", "weight norm", "train.max_weight_growth",
                                 "--resume auto")
    assert rc == 3 and "No checkpoint holds healthy weights" in line
    assert list_checkpoints(run) == []  # the exploded weights were never written
    # the same directory starts again from step 0 with a sane learning rate
    rc, out, err = cli(capsys, "train", "--resume", "auto", f"run.dir={run}", "train.lr=1e-3", "train.steps=4",
                       "--no-progress")
    assert rc == 0, err
    assert "starting again from step 0" in out
    assert [p.name for p in list_checkpoints(run)][-1] == "step_0000004"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the diverged attempt's records are gone


@pytest.mark.parametrize("value", [".inf", ".nan", "-1e-3", "0"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_before_any_folder(tmp_path, capsys, value):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *BASE, f"train.lr={value}", f"run.dir={run}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "'train.lr'")
    assert not run.exists()


class _Poisoned:
    """The real objective, with the loss multiplied by ``factor`` (NaN or huge) at chosen step indices."""

    def __init__(self, trainer, bad_steps, factor=float("nan")):
        self.inner, self.trainer, self.bad, self.factor = trainer.objective, trainer, set(bad_steps), factor

    def draw(self, *args, **kwargs):
        return self.inner.draw(*args, **kwargs)

    def loss(self, *args, **kwargs):
        loss, per_sample, t = self.inner.loss(*args, **kwargs)
        if self.trainer.step in self.bad:
            loss = loss * self.factor
        return loss, per_sample, t


def test_a_non_finite_streak_keeps_the_last_good_checkpoint_and_sets_the_broken_one_aside(tmp_path, reference):
    # checkpoints at 2 and 4; from step index 4 on every loss is NaN, so the weights of step_0000004 (which
    # only step 4 ever used) are broken; keep_checkpoints=1 must still not prune step_0000002
    run = tmp_path / "run"
    cfg = load_config(None, [*BASE, "train.steps=50", "train.checkpoint_every=2", "train.keep_checkpoints=1",
                             "train.max_consecutive_skips=3", f"run.dir={run}"])
    trainer = Trainer(cfg, progress=False)
    trainer.objective = _Poisoned(trainer, bad_steps=range(4, 50))
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    message = str(err.value)
    assert "3 consecutive steps (5-7)" in message and "step_0000002" in message
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert (run / "checkpoints/diverged_step_0000004").is_dir() and "diverged_step_0000004" in message
    assert verify_checkpoint(run / "checkpoints/step_0000002") is None
    assert_same_weights(weights(run, 2), weights(reference, 2))
    # --resume auto continues from the good one and ends exactly where an unpoisoned run ends
    train(load_config(None, [*BASE, "train.steps=8", "train.checkpoint_every=2", f"run.dir={run}"]),
          resume="auto", progress=False)
    assert_same_weights(weights(run, 8), weights(reference, 8))
    assert_same_weights(weights(run, 8, "ema.safetensors"), weights(reference, 8, "ema.safetensors"))


def test_a_loss_spike_is_skipped_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [*BASE, "train.steps=30", f"run.dir={run}"])
    trainer = Trainer(cfg, progress=False)
    trainer.objective = _Poisoned(trainer, bad_steps={25}, factor=1e4)  # finite, but 10^4 x the median
    result = trainer.fit()
    assert trainer.skipped_steps == 1 and trainer.consecutive_skips == 0 and result.steps == 30
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert records[26]["skipped_steps"] == 1 and records[26]["loss"] is None  # the step was not learnt from
    assert records[25]["skipped_steps"] == 0


def test_the_spike_rule_against_a_numpy_median():
    guard = DivergenceGuard(loss_spike_factor=20.0, max_weight_growth=10.0)
    rng = np.random.default_rng(0)
    history = list(rng.uniform(0.1, 1.0, size=150))
    for i, x in enumerate(history):
        if i < SPIKE_MIN_HISTORY:
            assert not guard.is_spike(1e9)  # too little history to judge
        guard.record(x)
    median = float(np.median(history[-SPIKE_WINDOW:]))
    assert guard.is_spike(20.0 * median * 1.0001) and not guard.is_spike(20.0 * median * 0.9999)
    assert not DivergenceGuard(0.0, 10.0).is_spike(1e30)  # 0 disables the test
    guard.set_reference(2.0)
    assert guard.weight_problem(19.9) is None and "10x" in guard.weight_problem(20.1).replace("10.1x", "10x")
    assert "no longer finite" in guard.weight_problem(float("nan"))


def test_non_finite_weights_stop_the_run_and_are_never_written(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [*BASE, "train.steps=20", "train.checkpoint_every=2", "train.max_weight_growth=0",
                             f"run.dir={run}"])
    trainer = Trainer(cfg, progress=False)
    step = trainer.optimizer.step

    def poisoned_step(*args, **kwargs):  # an update that leaves a NaN behind (finite loss and gradients)
        out = step(*args, **kwargs)
        if trainer.step == 5:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] = float("nan")
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(TrainingDiverged, match="diverged at step 6: the weights are no longer finite") as err:
        trainer.fit()
    assert "step_0000004" in str(err.value)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    for ckpt in list_checkpoints(run):
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


# ----------------------------------------------------------------------------------------------
# 2. Damaged checkpoints: verified, skipped with the reason, never resumed silently
# ----------------------------------------------------------------------------------------------


def _truncate(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(ckpt):
    f = ckpt / "ema.safetensors"
    data = bytearray(f.read_bytes())
    data[:16] = b"\xff" * 16
    f.write_bytes(bytes(data))


def _empty_config(ckpt):
    (ckpt / "config.json").write_text("")


def _random_tensor_bytes(ckpt):  # the worst case: the file still parses, only numbers changed
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) - 400, len(data), size=32):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


def _missing_manifest_entry(ckpt):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    del manifest["files"]["train_state.pt"]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _empty_config, _random_tensor_bytes,
                                    _missing_manifest_entry])
def test_resume_auto_falls_back_from_a_damaged_newest_checkpoint_and_stays_exact(tmp_path, capsys, reference,
                                                                                damage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for late in ("step_0000008", "step_0000006"):
        shutil.rmtree(run / "checkpoints" / late)
    damage(run / "checkpoints/step_0000004")
    reason = verify_checkpoint(run / "checkpoints/step_0000004")
    assert reason is not None
    rc, out, err = cli(capsys, "train", "--resume", "auto", f"run.dir={run}", "train.steps=8", "--no-progress")
    assert rc == 0, err
    assert f"Skipping damaged checkpoint {run / 'checkpoints/step_0000004'}: {reason}" in out
    assert f"Resumed from {run / 'checkpoints/step_0000002'} at step 2" in out
    assert_same_weights(weights(run, 8), weights(reference, 8))


def test_an_explicitly_named_damaged_checkpoint_is_an_error_and_config_yaml_is_untouched(tmp_path, capsys,
                                                                                       reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _random_tensor_bytes(run / "checkpoints/step_0000006")
    config_file = run / "config.yaml"
    before, mtime = config_file.read_bytes(), config_file.stat().st_mtime_ns
    rc, _, err = cli(capsys, "train", "--resume", run / "checkpoints/step_0000006", f"run.dir={run}",
                     "train.steps=10", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "step_0000006", "damaged", "model.safetensors")
    assert config_file.read_bytes() == before and config_file.stat().st_mtime_ns == mtime
    # sampling from the run falls back too, and says so; an explicit damaged checkpoint is one line
    _random_tensor_bytes(run / "checkpoints/step_0000008")
    rc, _, err = cli(capsys, "sample", "--checkpoint", run, "--num", 2, "--steps", 2, "--out", tmp_path / "s.png")
    assert rc == 0 and "skipping damaged checkpoint" in err and (tmp_path / "s.png").is_file()
    rc, _, err = cli(capsys, "sample", "--checkpoint", run / "checkpoints/step_0000008", "--num", 2,
                     "--no-ema", "--out", tmp_path / "t.png")
    assert rc == 2
    assert_one_line_error(err, "step_0000008", "model.safetensors")


def test_every_checkpoint_damaged_is_refused_naming_each(tmp_path, capsys, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for ckpt in list_checkpoints(run):
        _empty_config(ckpt)
    assert newest_intact_checkpoint(run)[0] is None
    rc, _, err = cli(capsys, "train", "--resume", "auto", f"run.dir={run}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "every checkpoint", "step_0000002", "step_0000008", "config.json")


def test_a_pickled_training_state_is_refused_in_one_line(tmp_path, capsys):
    ckpt = tmp_path / "step_0000008"
    ckpt.mkdir()
    torch.save({"step": 8, "evil": Path("/")}, ckpt / "train_state.pt")  # a pickled object, not a tensor
    with pytest.raises(Exception, match="refusing to unpickle"):
        load_train_state(ckpt)
    evil = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, evil)
    rc, _, err = cli(capsys, "convert", "from-official-dit", evil, tmp_path / "out")
    assert rc == 2
    assert_one_line_error(err, "evil.pt", "refusing to unpickle")


# ----------------------------------------------------------------------------------------------
# 3. Killed before the first checkpoint; the SLURM requeue script, run as a script
# ----------------------------------------------------------------------------------------------


def _wait(predicate, proc, timeout=90.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _fake_cluster(bin_dir: Path) -> dict:
    """scontrol, srun and torchrun stand-ins: one node, one process, the real ldmkit."""
    bin_dir.mkdir()
    scripts = {
        "scontrol": "#!/bin/bash\necho localhost\n",
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "torchrun": f'#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec {sys.executable} "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
            "SLURM_NODEID": "0", "GPUS_PER_NODE": "1"}


@pytest.mark.slow
def test_the_slurm_script_requeues_a_job_killed_before_its_first_checkpoint(tmp_path, capsys):
    script = ROOT / "examples/slurm_train.sbatch"
    doc = (ROOT / "docs/training.md").read_text()
    assert script.read_text().strip() in doc  # the documented script is the tested one
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")  # everything comes from the overrides
    run = tmp_path / "run"
    env = {**_fake_cluster(tmp_path / "bin"), "RECIPE": str(recipe), "RUN": str(run)}

    def job(*overrides):
        return subprocess.Popen(["bash", str(script), *BASE, *overrides, "--no-progress"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    first = job("train.steps=5000", "train.checkpoint_every=100000")
    _wait(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    assert list_checkpoints(run) == [] and (run / "config.yaml").is_file()

    second = job("train.steps=6", "train.checkpoint_every=3")  # the requeued job
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err[-3000:]
    assert "starting again from step 0" in out
    third = job("train.steps=9", "train.checkpoint_every=3")  # requeued after a clean stop: continues
    out, err = third.communicate(timeout=180)
    assert third.returncode == 0, err[-3000:]
    assert "Resumed from" in out and "at step 6" in out
    reference = tmp_path / "reference"
    train(load_config(None, [*BASE, "train.steps=9", "train.checkpoint_every=3", f"run.dir={reference}"]),
          progress=False)
    assert_same_weights(weights(run, 9), weights(reference, 9))


def test_resume_auto_of_a_folder_without_checkpoint_or_config_is_refused(tmp_path, capsys):
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger/notes.txt").write_text("x")
    rc, _, err = cli(capsys, "train", *BASE, "--resume", "auto", f"run.dir={tmp_path / 'stranger'}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "stranger", "config.yaml", "cannot resume")


# ----------------------------------------------------------------------------------------------
# 4. A resume may not change the data or noise streams
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["seed=1", "data.image_size=32", "model.hidden_size=32"])
def test_resume_refuses_a_changed_seed_or_stream_naming_the_key(tmp_path, capsys, reference, change):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "config.yaml").read_bytes()
    rc, _, err = cli(capsys, "train", "--resume", "auto", f"run.dir={run}", change, "train.steps=10", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, change.split("=")[0], "cannot resume")
    assert (run / "config.yaml").read_bytes() == before
    assert list_checkpoints(run)[-1].name == "step_0000008"


# ----------------------------------------------------------------------------------------------
# 5. Errors found before any folder is made
# ----------------------------------------------------------------------------------------------


def _image_folders(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (24, 20), (40 * i % 255, 100, 200)).save(root / name / f"{i}.png")
    return root


def _captioned_folder(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (24, 24), (60 * i, 80, 120)).save(root / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"picture {i}"})
    captions = root / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows))
    return root, captions


def test_model_and_conditioning_errors_come_before_the_run_folder(tmp_path, capsys):
    folders = _image_folders(tmp_path / "in", {"a": 2, "b": 2})
    flat, captions = _captioned_folder(tmp_path / "flat")
    cases = [
        (["model.patch_size=3"], ["'model.patch_size'", "16x16"]),
        (["model.options.foo=1"], ["'model.options.foo'"]),
        (["cond.semantic=text"], ["'cond.semantic'", "dit-tiny/4"]),
        (["data.name=folder", f"data.path={flat}", f"data.captions={captions}"], ["'cond.semantic'", "captions only"]),
        (["model.name=pixart-tiny/4", "cond.semantic=text", "data.name=imagenet", f"data.path={folders}"],
         ["'cond.semantic'", "class labels only"]),
    ]
    for i, (overrides, needles) in enumerate(cases):
        run = tmp_path / f"run{i}"
        rc, _, err = cli(capsys, "train", *BASE, *overrides, "train.steps=1", f"run.dir={run}", "--no-progress")
        assert rc == 2, (overrides, err)
        assert_one_line_error(err, *needles)
        assert not run.exists(), overrides


def test_data_path_errors_are_one_line_before_the_run_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    with_empty_class = _image_folders(tmp_path / "partial", {"cats": 2, "dogs": 0})
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path / "missing", ["'data.path'".strip("'"), "does not exist"]),
        (a_file, ["is not a directory"]),
        (empty, ["holds no image files"]),
        (loose, ["holds no image files", "class sub-folders"]),
        (with_empty_class, ["'dogs'", "hold no image files"]),
    ]
    for i, (path, needles) in enumerate(cases):
        run = tmp_path / f"run{i}"
        rc, _, err = cli(capsys, "train", *BASE, "data.name=imagenet", f"data.path={path}", f"run.dir={run}",
                         "--no-progress")
        assert rc == 2, (path, err)
        assert_one_line_error(err, "data.path", *needles)
        assert not run.exists()


def test_an_unreadable_class_folder_is_one_line(tmp_path, capsys, monkeypatch):
    folders = _image_folders(tmp_path / "in", {"a": 2, "b": 2})
    real_scandir = os.scandir

    def scandir(path="."):  # root may read anything, so permissions are simulated
        if str(path).endswith(os.sep + "b"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rc, _, err = cli(capsys, "train", *BASE, "data.name=imagenet", f"data.path={folders}",
                     f"run.dir={tmp_path / 'run'}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "data.path", str(folders / "b"), "Permission denied")
    assert not (tmp_path / "run").exists()


def test_a_duplicate_section_in_a_recipe_is_an_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\nmodel:\n  name: dit-tiny/4\ntrain:\n  lr: 1.0e-3\n")
    rc, _, err = cli(capsys, "train", recipe, f"run.dir={tmp_path / 'run'}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "r.yaml", "'train' appears twice", "line 5")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# 6-7. Every number and path a command takes is checked; one line, no traceback
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    train(load_config(None, [*BASE, "train.steps=2", f"run.dir={run}"]), progress=False)
    return run


@pytest.mark.parametrize("flags, needle", [
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"), (["--guidance", "-1"], "--guidance"),
    (["--control-guidance", "nan"], "--control-guidance"),
    (["--shift", "0"], "--shift"), (["--shift", "-2"], "--shift"),
    (["--interval", "0.9,0.1"], "--interval"), (["--interval", "0,2"], "--interval"),
    (["--num", "0"], "--num"), (["--num", "-4"], "--num"), (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"),
    (["--eta", "2"], "--eta"), (["--size", "0,64"], "--size"), (["--crop", "-1,0"], "--crop"),
    (["--seed", "-1"], "--seed"), (["--out", "grid"], "--out"), (["--steps", "ten"], "--steps"),
])
def test_nonsense_sampling_values_are_refused(tmp_path, capsys, small_run, flags, needle):
    out = ["--out", tmp_path / "x.png"] if "--out" not in flags else []
    rc, _, err = cli(capsys, "sample", "--checkpoint", small_run, *flags, *out)
    assert rc == 2
    assert_one_line_error(err, needle)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", [
    ["eval", "shapes", "--per-class", "0"], ["eval", "shapes", "--per-caption", "-1"],
    ["eval", "disentangle", "--num", "0"], ["eval", "disentangle", "--sizes", "16,0"],
    ["eval", "fid", "--num-samples", "1", "--ref", "x.npz"], ["eval", "fid", "--chunk", "0", "--ref", "x.npz"],
    ["eval", "fid", "--batch-size", "-1", "--ref", "x.npz"],
])
def test_nonsense_evaluation_values_are_refused(capsys, small_run, command):
    rc, _, err = cli(capsys, *command, "--checkpoint", small_run)
    assert rc == 2
    assert_one_line_error(err, next(a for a in command if a.startswith("--")))


def test_a_wrong_inception_file_fails_before_any_sample_is_drawn(tmp_path, capsys, small_run):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    wrong = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    for content in (os.urandom(4096), None):
        if content is None:  # a real state dict, of another network
            torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
        else:
            wrong.write_bytes(content)
        out = tmp_path / "fid"
        rc, _, err = cli(capsys, "eval", "fid", "--checkpoint", small_run, "--ref", ref, "--inception", wrong,
                         "--num-samples", 4, "--out", out)
        assert rc == 2
        assert_one_line_error(err, str(wrong))
        assert not out.exists()


def test_eval_shapes_writes_into_a_folder_that_does_not_exist_yet(tmp_path, capsys, small_run):
    out = tmp_path / "new/deeper/result.json"
    rc, _, err = cli(capsys, "eval", "shapes", "--checkpoint", small_run, "--per-class", 1, "--steps", 2,
                     "--out", out)
    assert rc == 0, err
    assert json.loads(out.read_text())["n"] == 9  # one sample of each of the 9 classes


def test_run_folder_and_name_errors_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, _, err = cli(capsys, "train", *BASE, f"run.dir={a_file}", "--no-progress")
    assert rc == 2
    assert_one_line_error(err, "run.dir", "is a file")
    for name in ("../escape", "a/b", ".."):
        rc, _, err = cli(capsys, "train", *BASE, f"run.name={name}", "--no-progress")
        assert rc == 2
        assert_one_line_error(err, "'run.name'")
    assert not (ROOT / "escape").exists() and not (ROOT / "runs/a").exists()


def test_options_may_follow_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *BASE, "train.steps=1", f"run.dir={run}", "--no-progress")[0] == 0
    # CONFIG key=value --resume auto key=value, in any order
    rc, out, err = cli(capsys, "train", *BASE, f"run.dir={run}", "--resume", "auto", "train.steps=2",
                       "--no-progress")
    assert rc == 0, err
    assert list_checkpoints(run)[-1].name == "step_0000002"
    rc, _, err = cli(capsys, "train", *BASE, f"run.dir={run}", "--bogus")
    assert rc == 2
    assert_one_line_error(err, "--bogus")


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc, _, err = cli(capsys, "--debug", "train", *BASE, f"run.dir={tmp_path / 'file'}", "data.name=imagenet",
                     f"data.path={tmp_path / 'missing'}", "--no-progress")
    assert rc == 2 and "Traceback" in err and "ldmkit: error: data.path" in err


def test_sampling_needs_no_dataset_the_class_names_travel_with_the_checkpoint(tmp_path, capsys):
    from ldmkit.train.checkpoint import read_class_names

    data = _image_folders(tmp_path / "data", {"cats": 3, "dogs": 3})
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *BASE, "data.name=imagenet", f"data.path={data}", "train.steps=2",
                     f"run.dir={run}", "--no-progress")
    assert rc == 0, err
    assert read_class_names(list_checkpoints(run)[-1]) == ["cats", "dogs"]
    shutil.rmtree(data)  # the run is sampled on a machine without its training data
    rc, out, err = cli(capsys, "sample", "--checkpoint", run, "--class", "dogs", "--num", 2, "--steps", 2,
                       "--out", tmp_path / "dogs.png")
    assert rc == 0, err
    assert "class 'dogs'" in out and (tmp_path / "dogs.png").is_file()
    rc, _, err = cli(capsys, "sample", "--checkpoint", run, "--class", "dgos", "--out", tmp_path / "x.png")
    assert rc == 2
    assert_one_line_error(err, "'dgos'", "did you mean 'dogs'")
