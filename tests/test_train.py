"""End to end: train a few steps, checkpoint, sample from the checkpoint alone, resume exactly."""

import itertools
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.data.stream import StreamSampler
from ldmkit.train.checkpoint import CHECKPOINT_FILES, list_checkpoints, load_model, save_weights
from ldmkit.train.trainer import RunDirError, Trainer, lr_at, train

TINY = [
    "data.image_size=16", "data.shapes.colours=[red,green,blue]", "model.name=dit-tiny/4",
    "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=2",
    "train.checkpoint_every=3", "train.sample_every=0", "train.keep_checkpoints=0",
    "sample.steps=2", "sample.grid_rows=1", "eval.shapes_per_class=1",
]


def tiny_config(run_dir, *extra):
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def test_train_writes_everything_and_sample_works_from_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    result = train(tiny_config(run, "train.steps=6"), progress=False)
    assert result.steps == 6
    out = capsys.readouterr().out
    for thing in ("samples/final.png", "checkpoints/step_0000006", "metrics.jsonl", "eval_shapes.json"):
        assert thing in out  # the run ends by saying where everything is

    saved = load_config(run / "config.yaml")
    assert saved.train.steps == 6 and saved.model.name == "dit-tiny/4"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 and r["lr"] > 0 for r in train_records)
    assert any("eval/shapes_colour" in r for r in records)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003", "step_0000006"]
    for name in CHECKPOINT_FILES:
        assert (run / "checkpoints/step_0000006" / name).is_file()
    assert Image.open(run / "samples/final.png").size[0] > 0
    assert (run / "curves.png").is_file()

    # the EMA weights differ from the raw ones, and both rebuild the model from the checkpoint alone
    raw = load_file(str(run / "checkpoints/step_0000006/model.safetensors"))
    ema = load_file(str(run / "checkpoints/step_0000006/ema.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    model, cfg = load_model(run)
    assert cfg["train"]["steps"] == 6
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in ema.values())

    grid = tmp_path / "grid.png"
    rc = main(["sample", "--checkpoint", str(run), "--class", "2", "--num", "4", "--guidance", "4",
               "--steps", "3", "--out", str(grid)])
    assert rc == 0
    w, h = Image.open(grid).size
    assert w == h and w >= 2 * 64  # a 2x2 grid of tiles enlarged to >= 64 px
    rc = main(["sample", "--checkpoint", str(run), "--class", "green square", "--num", "1",
               "--steps", "2", "--out", str(tmp_path / "one.png")])
    assert rc == 0
    rc = main(["sample", "--checkpoint", str(run), "--class", "purple circle", "--out", str(grid)])
    assert rc == 2 and "not a class of this model" in capsys.readouterr().err

    rc = main(["eval", "shapes", "--checkpoint", str(run), "--per-class", "1", "--steps", "2",
               "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 9 and 0 <= result["colour"] <= 1 and result["settings"]["steps"] == 2


def _tensors(path):
    return load_file(str(path))


def _state(run, step):
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    return _tensors(ckpt / "model.safetensors"), _tensors(ckpt / "ema.safetensors"), state


def test_resume_gives_bit_identical_weights_ema_and_optimizer(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ["eval.shapes_at_end=false", "sample.grid_rows=1"]
    train(tiny_config(straight, "train.steps=6", *extra), progress=False)
    train(tiny_config(split, "train.steps=3", *extra), progress=False)
    train(tiny_config(split, "train.steps=6", *extra), resume="auto", progress=False)

    w1, e1, s1 = _state(straight, 6)
    w2, e2, s2 = _state(split, 6)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
        assert torch.equal(e1[k], e2[k]), k
    assert s1["step"] == s2["step"] == 6 and s1["data_position"] == s2["data_position"] == 48
    opt1, opt2 = s1["optimizer"]["state"], s2["optimizer"]["state"]
    assert opt1.keys() == opt2.keys()
    for k in opt1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt1[k][name], opt2[k][name])
    assert torch.equal(s1["torch_rng"], s2["torch_rng"])


def test_a_run_never_overwrites_another(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("x")
    with pytest.raises(RunDirError, match="already exists"):
        train(tiny_config(run, "train.steps=1"), progress=False)
    rc = main(["train", *TINY, f"run.dir={run}", "train.steps=1", "--no-progress"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["precious.txt"]


def test_resume_auto_skips_half_written_checkpoints_and_can_change_only_safe_keys(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "train.steps=3", "eval.shapes_at_end=false"), progress=False)
    # an interrupted save and a directory missing files must never be picked
    (run / "checkpoints/.step_0000009.tmp").mkdir()
    broken = run / "checkpoints/step_0000010"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003"]
    with pytest.raises(Exception, match="model.hidden_size"):
        train(tiny_config(run, "train.steps=4", "model.hidden_size=32"), resume="auto", progress=False)
    result = train(tiny_config(run, "train.steps=4", "eval.shapes_at_end=false"), resume="auto",
                   progress=False)
    assert result.steps == 4
    assert not (run / "checkpoints/.step_0000009.tmp").exists()  # cleaned by the next save


def test_cli_resume_reads_the_run_config(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"run.dir={run}", "train.steps=2", "eval.shapes_at_end=false",
                 "--no-progress"]) == 0
    assert main(["train", "--resume", f"run.dir={run}", "train.steps=3", "--no-progress"]) == 0
    assert list_checkpoints(run)[-1].name == "step_0000003"


def test_cli_config_errors_fail_before_any_work(tmp_path, capsys):
    run = tmp_path / "never"
    rc = main(["train", "configs/quickstart.yaml", f"run.dir={run}", "train.step=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "'train.step'" in err and "'train.steps'" in err
    assert not run.exists()


def test_learning_rate_schedule():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=4", "train.steps=14",
                             "train.lr_schedule=cosine", "train.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_stream_is_resumable_and_shards_are_disjoint():
    full = list(itertools.islice(iter(StreamSampler(10, seed=3, global_batch=4)), 36))
    assert sorted(i for _, i in full[:10]) == list(range(10))  # each epoch is a permutation
    assert [i for _, i in full[:10]] != [i for _, i in full[10:20]]  # reshuffled per epoch
    assert [e for e, _ in full[:21]] == [0] * 10 + [1] * 10 + [2]
    # resuming at a global position continues the same stream
    resumed = list(itertools.islice(iter(StreamSampler(10, seed=3, global_batch=4, start=16)), 20))
    assert resumed == full[16:36]
    # two ranks read disjoint halves of each global batch; together they read the 1-rank stream
    ranks = [list(itertools.islice(iter(StreamSampler(10, seed=3, global_batch=4, rank=r, world_size=2)), 6))
             for r in range(2)]
    for step in range(3):
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == full[4 * step : 4 * step + 4]
    with pytest.raises(ValueError, match="divisible"):
        StreamSampler(10, seed=3, global_batch=5, world_size=2)


def test_init_from_a_run_or_a_weights_dir_starts_from_those_weights(tmp_path):
    source = tmp_path / "source"
    train(tiny_config(source, "train.steps=3"), progress=False)
    ema = load_file(str(source / "checkpoints/step_0000003/ema.safetensors"))
    weights_dir = save_weights(load_model(source)[0], tmp_path / "weights")

    for init in (source, weights_dir):
        run = tmp_path / f"from_{init.name}"
        trainer = Trainer(tiny_config(run, f"init.from={init}"), progress=False)
        state = trainer.model.state_dict()
        assert set(state) == set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)
        report = json.loads((run / "init_report.json").read_text())
        assert report["fraction_from_source"] == 1.0 and not report["reinitialised"]
        assert load_config(run / "config.yaml").init.from_ == str(init)  # `init.from` round-trips

    with pytest.raises(ValueError, match=r"init.from=.*would set only .*init.allow_partial"):
        Trainer(tiny_config(tmp_path / "wider", f"init.from={source}", "model.hidden_size=96"),
                progress=False)
    with pytest.raises(FileNotFoundError, match="init.from"):
        Trainer(tiny_config(tmp_path / "nowhere", f"init.from={tmp_path / 'missing'}"), progress=False)
    assert not (tmp_path / "nowhere").exists()  # checked before the run directory is made


def test_prefetch_keeps_the_order_raises_where_the_bad_batch_is_taken_and_stops_when_dropped():
    import gc
    import threading

    from ldmkit.train.build import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield "a"
        yield "b"
        raise ValueError("a damaged batch")

    it = prefetch(broken())
    assert next(it) == "a" and next(it) == "b"
    with pytest.raises(ValueError, match="damaged"):
        next(it)
    before = set(threading.enumerate())
    it = prefetch(iter(range(10**9)))
    assert next(it) == 0
    (reader,) = [t for t in threading.enumerate() if t not in before and t.name == "ldmkit-prefetch"]
    del it
    gc.collect()
    reader.join(timeout=5)
    assert not reader.is_alive()  # the reader thread ended with its iterator


def test_read_ahead_gives_the_same_batches_and_is_used_only_where_it_frees_cores(tmp_path):
    from ldmkit.train import distributed as D
    from ldmkit.train.build import build_training_data, reads_ahead, training_batches

    cfg = tiny_config(tmp_path / "run")
    dist = D.Dist()
    dataset = build_training_data(cfg, dist)
    plain = training_batches(dataset, cfg, dist, 4, position=6)
    ahead = training_batches(dataset, cfg, dist, 4, position=6, read_ahead=True)
    for a, b in itertools.islice(zip(plain, ahead), 5):
        assert torch.equal(a.images, b.images) and a.captions == b.captions and a.ground_truth == b.ground_truth
        assert torch.equal(a.cond.class_ids, b.cond.class_ids) and a.cond.control.keys() == b.cond.control.keys()
        assert all(torch.equal(a.cond.control[k], b.cond.control[k]) for k in a.cond.control)
    assert not reads_ahead(cfg, torch.device("cpu"))  # the step already uses every core
    assert reads_ahead(cfg, torch.device("cuda"))
    workers = load_config(None, [*TINY, f"run.dir={tmp_path / 'w'}", "data.num_workers=2"])
    assert not reads_ahead(workers, torch.device("cuda"))  # the loader's workers read ahead already
