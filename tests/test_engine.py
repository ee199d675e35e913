"""The training engine: exact resume after clean stops, signals and SIGKILL; torchrun DDP/FSDP2;
gradient accumulation and checkpointing; guard rails; telemetry."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.config import load_config
from ldmkit.models import build_model
from ldmkit.models.flops import forward_flops_per_image
from ldmkit.train.checkpoint import list_checkpoints
from ldmkit.train.trainer import Trainer, TrainingDiverged, train

# One thread everywhere: subprocesses and in-process runs must do the same float arithmetic.
BASE = [
    "data.image_size=16", "data.shapes.colours=[red,green,blue]", "model.name=dit-tiny/4",
    "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=2",
    "train.checkpoint_every=100", "train.sample_every=0", "train.keep_checkpoints=0",
    "train.threads=1", "eval.shapes_at_end=false", "sample.steps=2", "sample.grid_rows=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", "train", *args, "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def torchrun(*args, nproc=2, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ldmkit.cli", "train", *args, "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def final_state(run, step):
    ckpt = Path(run) / "checkpoints" / f"step_{step:07d}"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors")), state


def assert_same_run(a, b, step, exact=True, atol=1e-6):
    wa, ea, sa = final_state(a, step)
    wb, eb, sb = final_state(b, step)
    assert wa.keys() == wb.keys() and ea.keys() == eb.keys()
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=atol, rtol=0))
    for k in wa:
        assert close(wa[k], wb[k]), f"weights differ at {k}"
        assert close(ea[k], eb[k]), f"EMA differs at {k}"
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert close(oa[k][name], ob[k][name]), f"optimizer {name} differs at {k}"
    assert sa["step"] == sb["step"] == step and sa["data_position"] == sb["data_position"]
    if exact:
        assert torch.equal(sa["torch_rng"], sb["torch_rng"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """40 steps in one go, in this process."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, [*BASE, "train.steps=40", f"run.dir={run}"]), progress=False)
    return run


def wait_for(predicate, proc, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def logged_step(run):
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines), default=0)


# ----------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, reference, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "train", *BASE, "train.steps=5000",
                             f"run.dir={run}", "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_step(run) >= 6, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "Stopped by a signal" in out
    stopped_at = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert 6 <= stopped_at < 40
    # metrics logged the stop step; resuming continues and matches the uninterrupted run bit for bit
    assert logged_step(run) == stopped_at
    train(load_config(None, [*BASE, "train.steps=40", f"run.dir={run}"]), resume="auto", progress=False)
    assert_same_run(reference, run, 40)


def test_sigkill_at_an_arbitrary_moment_then_resume_auto_is_exact(tmp_path, reference):
    run = tmp_path / "run"
    # a checkpoint every step: the kill lands during a checkpoint write as often as not
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "train", *BASE, "train.steps=5000",
                             "train.checkpoint_every=1", "train.keep_checkpoints=3",
                             f"run.dir={run}", "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list_checkpoints(run)) >= 2, proc)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    proc.kill()
    proc.communicate(timeout=30)
    found = list_checkpoints(run)
    assert len(found) >= 2 and int(found[-1].name.split("_")[1]) < 40
    # and the newest checkpoint is damaged afterwards (bytes flipped inside a tensor, the file still parses):
    # the resume notices it against the manifest and continues from the one before, still exact
    weights_file = found[-1] / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    weights_file.write_bytes(bytes(data))
    trainer = Trainer(load_config(None, [*BASE, "train.steps=40", f"run.dir={run}"]), resume="auto", progress=False)
    assert trainer.step == int(found[-2].name.split("_")[1])
    trainer.fit()
    assert_same_run(reference, run, 40)
    # records of steps redone after the resume appear once
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_clean_stop_and_resume_is_exact(tmp_path, reference):
    run = tmp_path / "run"
    train(load_config(None, [*BASE, "train.steps=17", f"run.dir={run}"]), progress=False)
    train(load_config(None, [*BASE, "train.steps=40", f"run.dir={run}"]), resume="auto", progress=False)
    assert_same_run(reference, run, 40)


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun on CPU with gloo)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, parallel):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli(*BASE, "train.steps=4", f"run.dir={one}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = torchrun(*BASE, "train.steps=4", f"train.parallel={parallel}", f"run.dir={two}")
    assert f"x 2 ranks ({parallel})" in out.stdout
    assert_same_run(one, two, 4, exact=False, atol=1e-6)


@pytest.mark.slow
def test_checkpoints_move_between_world_sizes(tmp_path):
    one = tmp_path / "one"
    assert run_cli(*BASE, "train.steps=4", f"run.dir={one}").returncode == 0
    # written by 2 ranks (DDP), resumed by 1 process
    a = tmp_path / "two_then_one"
    torchrun(*BASE, "train.steps=2", f"run.dir={a}")
    r = run_cli(*BASE, "train.steps=4", f"run.dir={a}", "--resume")
    assert r.returncode == 0 and "Resumed" in r.stdout, r.stderr[-3000:]
    assert_same_run(one, a, 4, exact=False)
    # written by 1 process, resumed by 2 ranks sharding the model (FSDP2)
    b = tmp_path / "one_then_two"
    assert run_cli(*BASE, "train.steps=2", f"run.dir={b}").returncode == 0
    torchrun(*BASE, "train.steps=4", "train.parallel=fsdp", f"run.dir={b}", "--resume")
    assert_same_run(one, b, 4, exact=False)


# ----------------------------------------------------------------------------------------------
# Speed levers that must not change the result
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lever", ["train.grad_accum=4", "train.grad_checkpointing=true",
                                   "train.optimizer_impl=for_loop"])
def test_levers_leave_the_training_result_unchanged(tmp_path, lever):
    base, other = tmp_path / "base", tmp_path / "other"
    train(load_config(None, [*BASE, "train.steps=3", f"run.dir={base}"]), progress=False)
    train(load_config(None, [*BASE, "train.steps=3", lever, f"run.dir={other}"]), progress=False)
    # GPU kernels (fused AdamW, split reductions) round differently from the CPU loop
    assert_same_run(base, other, 3, exact=False, atol=1e-5 if torch.cuda.is_available() else 1e-6)


@pytest.mark.slow
def test_compile_keeps_parameter_names_and_results(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(load_config(None, [*BASE, "train.steps=2", f"run.dir={eager}"]), progress=False)
    train(load_config(None, [*BASE, "train.steps=2", "train.compile=true", f"run.dir={compiled}"]),
          progress=False)
    assert_same_run(eager, compiled, 2, exact=False, atol=1e-5)


def test_bf16_and_fp16_autocast_train(tmp_path):
    for precision in ("bf16", "fp16"):
        run = tmp_path / precision
        result = train(load_config(None, [*BASE, "train.steps=3", f"train.precision={precision}",
                                          f"run.dir={run}"]), progress=False)
        state = torch.load(result.checkpoint / "train_state.pt", weights_only=True)
        assert state["step"] == 3
        if precision == "fp16":
            assert state["grad_scaler"]["scale"] > 0


# ----------------------------------------------------------------------------------------------
# Guard rails
# ----------------------------------------------------------------------------------------------


class _PoisonedLoss:
    """The real objective, but the loss of the listed steps is multiplied by NaN."""

    def __init__(self, trainer, bad_steps):
        self.trainer, self.inner, self.bad = trainer, trainer.objective, set(bad_steps)

    def draw(self, *args, **kwargs):
        return self.inner.draw(*args, **kwargs)

    def loss(self, *args, **kwargs):
        loss, per_sample, t = self.inner.loss(*args, **kwargs)
        if self.trainer.step in self.bad:
            loss = loss * float("nan")
        return loss, per_sample, t


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path):
    trainer = Trainer(load_config(None, [*BASE, "train.steps=6", f"run.dir={tmp_path / 'run'}"]),
                      progress=False)
    trainer.objective = _PoisonedLoss(trainer, bad_steps={2, 3})
    result = trainer.fit()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 2 and trainer.skipped_steps == 2
    by_step = {r["step"]: r for r in records}
    # steps 3 and 4 (0-based 2 and 3) form one log window with no good step: no loss, no norm
    assert by_step[4]["loss"] is None and by_step[4]["grad_norm"] is None
    assert by_step[4]["skipped_steps"] == 2 and by_step[2]["skipped_steps"] == 0
    assert by_step[2]["grad_norm"] > 0 and by_step[6]["grad_norm"] > 0
    state = torch.load(result.checkpoint / "train_state.pt", weights_only=True)
    assert state["skipped_steps"] == 2 and state["consecutive_skips"] == 0
    # a skipped step leaves the weights as they were: the run equals one that never saw those batches'
    # updates, so its AdamW step count is 6 - 2
    assert all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())


def test_too_many_consecutive_non_finite_steps_stop_naming_the_last_good_checkpoint(tmp_path):
    cfg = load_config(None, [*BASE, "train.steps=50", "train.max_consecutive_skips=3", "train.checkpoint_every=3",
                             f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.objective = _PoisonedLoss(trainer, bad_steps=range(4, 50))
    before = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="3 consecutive steps") as err:
        trainer.fit()
    # step_0000003's weights gave step 4 (index 3) a finite loss: the newest known-good checkpoint;
    # nothing of the diverged state is written
    assert "step_0000003" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000003"]
    weights = load_file(str(tmp_path / "run/checkpoints/step_0000003/model.safetensors"))
    assert any(not torch.equal(weights[k], before[k]) for k in weights)  # steps 0-2 did train
    assert trainer.consecutive_skips == 3 and trainer.skipped_steps == 3


# ----------------------------------------------------------------------------------------------
# Telemetry
# ----------------------------------------------------------------------------------------------


def test_flop_count_equals_the_dit_formula():
    c, s, p, d, depth, classes = 3, 16, 4, 64, 2, 9
    model = build_model("dit-tiny/4", in_channels=c, input_size=s, num_classes=classes)
    from ldmkit.conditioning import Conditioning

    flops = forward_flops_per_image(model, torch.randn(2, c, s, s), torch.rand(2),
                                    Conditioning(class_ids=torch.tensor([0, 1])))
    n = (s // p) ** 2
    expected = (
        2 * n * (c * p * p) * d  # patch embedding
        + 2 * (256 * d + d * d)  # timestep MLP
        + depth * (2 * d * 6 * d  # adaLN
                   + 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, QK^T and AV, proj
                   + 2 * 2 * n * d * 4 * d)  # MLP
        + 2 * d * 2 * d + 2 * n * d * p * p * c  # final adaLN and projection
    )
    assert flops == expected
    with torch.device("meta"):  # the trainer counts on a meta-device copy: same number, no compute
        meta_model = build_model("dit-tiny/4", in_channels=c, input_size=s, num_classes=classes)
    meta_flops = forward_flops_per_image(meta_model, torch.empty(1, c, s, s, device="meta"),
                                         torch.empty(1, device="meta"),
                                         Conditioning(class_ids=torch.zeros(1, dtype=torch.long, device="meta")))
    assert meta_flops == expected


def test_flops_of_the_improved_mmdit_are_counted():
    """A group without metadata returns its learned null embedding; as a view of a parameter under no_grad
    it once broke FlopCounterMode's module hooks (no MFU for the paper's model). Without control metadata
    the improved mmDiT computes what mmDiT computes, so the counts must match."""
    from ldmkit.conditioning import Conditioning

    counts = {}
    for name in ("mmdit-tiny/2", "mmdit-improved-tiny/2"):
        model = build_model(name, in_channels=4, input_size=16, num_classes=10)
        counts[name] = forward_flops_per_image(model, torch.randn(1, 4, 16, 16), torch.rand(1),
                                               Conditioning(class_ids=torch.tensor([3])))
    assert counts["mmdit-tiny/2"] > 0 and counts["mmdit-improved-tiny/2"] == counts["mmdit-tiny/2"]


def test_metrics_hold_the_telemetry_and_tensorboard_gets_it(tmp_path):
    pytest.importorskip("tensorboard")
    result = train(load_config(None, [*BASE, "train.steps=4", f"run.dir={tmp_path / 'run'}"]),
                   progress=False)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "grad_norm", "lr", "images_per_s", "steps_per_s", "tokens_per_s",
                "data_wait_frac", "peak_mem_gib", "model_tflops_per_image", "model_tflops_per_s",
                "skipped_steps"):
        assert key in record and record[key] is not None, key
    assert record["tokens_per_s"] == pytest.approx(record["images_per_s"] * 16)
    assert any(k.startswith("loss_t") for k in record)
    from ldmkit.train.telemetry import peak_tflops

    known_peak = peak_tflops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), "fp32", True)
    assert ("mfu" in record) == (known_peak is not None)  # MFU only where the peak is known
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_is_optional_and_offline_by_default(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, scalars, step):
            calls.setdefault("log", []).append((step, scalars))

        def finish(self):
            calls["finish"] = True

    class FakeWandb:
        class util:
            @staticmethod
            def generate_id():
                return "abc123"

        @staticmethod
        def init(**kwargs):
            calls["init"] = kwargs
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    run = tmp_path / "run"
    train(load_config(None, [*BASE, "train.steps=2", "train.wandb=true", f"run.dir={run}"]), progress=False)
    assert calls["init"]["mode"] == "offline" and calls["init"]["id"] == "abc123"
    assert calls["log"][-1][0] == 2 and "loss" in calls["log"][-1][1]
    assert calls["finish"] and (run / "wandb_id.txt").read_text() == "abc123"
