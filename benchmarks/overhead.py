"""Framework overhead: steps/s of ``ldmkit train``'s loop against a bare PyTorch loop of the same math.

All loops train the same model (the quickstart's, by default) from the same initial weights with the same
batch size, objective, AdamW and EMA, in one process, taking turns in rotating order in blocks of
``--block`` steps, so that the drifts of a shared machine hit them alike:
- the trainer's real loop body (``Trainer.run_step``: data loading and rendering, conditioning, the step
  and its guard, EMA, telemetry windows, log records, the periodic checks);
- the same loop body fed the bare loop's pre-rendered batches (the framework without the data pipeline);
- the bare loop: pre-rendered batches from memory, forward, backward, clipping, AdamW and the EMA update.
Each ratio to the bare loop is the share of its speed that loop keeps.

    python benchmarks/overhead.py                      # configs/quickstart.yaml on this machine
    python benchmarks/overhead.py --blocks 12 --block 20 --threads 2

Prints Markdown rows for benchmarks/RESULTS.md (steps/s of each loop, median over blocks, and the
ratio with its spread over blocks)."""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ldmkit.conditioning import Conditioning  # noqa: E402
from ldmkit.config import load_config  # noqa: E402
from ldmkit.train.step import lr_at, step_seed  # noqa: E402
from ldmkit.train.telemetry import StepWindow  # noqa: E402
from ldmkit.train.trainer import Trainer  # noqa: E402


class BareLoop:
    """Forward, backward, clipping, AdamW and EMA on batches already in memory: nothing else."""

    def __init__(self, trainer: Trainer, batches: list) -> None:
        cfg = trainer.cfg
        self.cfg, self.objective = cfg, trainer.objective
        self.model = copy.deepcopy(trainer.model)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay,
                                           foreach=True)
        self.batches = batches
        self.step = 0

    def __call__(self) -> None:
        cfg, B = self.cfg, self.cfg.train.batch_size
        images, class_ids = self.batches[self.step % len(self.batches)]
        g = torch.Generator().manual_seed(step_seed(cfg.seed, self.step))
        draw = self.objective.draw(B, tuple(images.shape[1:]), device=images.device, generator=g)
        dropped = torch.rand(B, generator=g) < cfg.cond.p_drop_semantic
        cond = Conditioning(class_ids=torch.where(dropped, -1, class_ids))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        loss, _, _ = self.objective.loss(self.model, images, cond, draw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        decay = cfg.train.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1 - decay)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=str(ROOT / "configs/quickstart.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--blocks", type=int, default=6, help="blocks per loop, in rotating order")
    p.add_argument("--block", type=int, default=20, help="steps per block")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="overhead-")) / "run"
    cfg = load_config(args.config, [*args.overrides, "train.steps=1000000", "train.sample_every=0",
                                    "train.checkpoint_every=1000000", "eval.shapes_at_end=false",
                                    f"run.dir={run_dir}", f"train.threads={args.threads}"])
    trainer = Trainer(cfg, progress=False)
    batches = trainer._batches()
    # the bare loop's data: the trainer's first batches, rendered once
    first = list(itertools.islice(trainer._batches(), 4))
    bare_data = [(b.images, b.cond.class_ids) for b in first]
    in_memory = itertools.cycle(first)  # the trainer's loop without the data pipeline: same batches as bare
    bare = BareLoop(trainer, bare_data)
    t = cfg.train
    window = StepWindow(trainer.dist, t.batch_size, getattr(trainer.model, "num_tokens", None))
    bar = tqdm(disable=True)
    start = time.time()
    loops = {"trainer": lambda: trainer.run_step(batches, window, bar, start),
             "trainer_in_memory": lambda: trainer.run_step(in_memory, window, bar, start),
             "bare": bare}
    for _ in range(3):  # warm up all
        for fn in loops.values():
            fn()
    rates: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for i in range(args.blocks):
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order, so drifts hit all alike
            t0 = time.perf_counter()
            for _ in range(args.block):
                loops[name]()
            rates[name].append(args.block / (time.perf_counter() - t0))

    def ratio(name: str) -> str:
        r = [a / b for a, b in zip(rates[name], rates["bare"])]
        return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"
    trainer._close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; model {cfg.model.name} ({trainer.n_params / 1e6:.2f}M), batch {t.batch_size}, "
          f"{cfg.data.image_size} px, {args.blocks} x {args.block} steps each, interleaved")
    print("| loop | steps/s (median) | trainer / bare (median, min-max over blocks) |")
    print("|---|---|---|")
    print(f"| bare PyTorch (pre-rendered batches) | {med['bare']:.2f} | |")
    print(f"| `ldmkit train` (`Trainer.run_step`) | {med['trainer']:.2f} | {ratio('trainer')} |")
    print(f"| `ldmkit train` on the bare loop's in-memory batches (no data pipeline) | {med['trainer_in_memory']:.2f} "
          f"| {ratio('trainer_in_memory')} |")


if __name__ == "__main__":
    main()
