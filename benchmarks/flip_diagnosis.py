"""Why does a text model's flip condition change nothing at sampling? Measurements along the whole path.

    python benchmarks/flip_diagnosis.py --checkpoint runs/RUN [--checkpoint runs/RUN/checkpoints/step_...]

For a text-to-image run on ``shapes`` (e.g. ``configs/quickstart_t2i.yaml``) it prints, per checkpoint:

1. data: how often training samples are flipped, and whether the left/right of their caption agrees with
   the image (read by the analytic evaluator, independent of the dataset's ground truth) when flip = 0 and
   disagrees when flip = 1; i.e. whether the flip field is the information the model needs;
2. control embedding: the norm of E_high(flip = 1) − E_high(flip = 0) against the norm of the timestep
   embedding and of the adaLN vector c, and against the learned null (is the null used? is it different?);
3. the model: the relative change of the predicted velocity when only the flip changes, at several t,
   for EMA and raw weights, next to the change when the caption's side word is swapped or the size or
   crop condition changes (does the model read its other inputs?);
4. samples: sided captions at flip 0 and flip 1 from the same noise: the largest pixel difference, how
   often the left/right reading differs, and left/right accuracy at both (at flip 1 the side a flipped
   training image shows is the mirror of the caption's).

Nothing is trained; the numbers go into docs/findings.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def data_check(cfg, n: int = 2000) -> dict:
    from ldmkit.data import build_dataset
    from ldmkit.eval.shapes import ShapesEvaluator, to_uint8_images

    ds = build_dataset(cfg.data, seed=cfg.seed)
    samples = [ds[i] for i in range(n)]
    flips = np.array([s["control"]["flip"] for s in samples])
    images = to_uint8_images(torch.stack([s["image"] for s in samples]))
    reads = ShapesEvaluator(colours=ds.colours, shapes=ds.shapes).analyze(images)
    out = {"n": n, "flip_rate": float(flips.mean())}
    for f in (0.0, 1.0):
        agree = []
        for s, r, fl in zip(samples, reads, flips):
            side = s["ground_truth"]["position"].split()[-1]
            if fl != f or side not in ("left", "right") or not r["found"]:
                continue
            agree.append(r["position"].split()[-1] == side)
        out[f"caption_side_shown_flip{int(f)}"] = float(np.mean(agree)) if agree else None
        out[f"n_sided_flip{int(f)}"] = len(agree)
    return out


@torch.no_grad()
def embedding_check(model, cfg) -> dict:
    from ldmkit.conditioning import Conditioning
    from ldmkit.sampling import default_control

    emb = model.control_embedder
    if emb is None or emb.high is None or "flip" not in emb.high.names:
        return {"flip_in_model": False}
    out = {"flip_in_model": True}
    size = cfg.data.image_size
    for t in (0.1, 0.5, 0.9):
        tt = torch.full((2,), t)
        c0 = Conditioning(control=default_control(1, size, flip=False))
        c1 = Conditioning(control=default_control(1, size, flip=True))
        h0 = emb.high(c0, 1, tt.device)[0]
        h1 = emb.high(c1, 1, tt.device)[0]
        temb = model.t_embedder(tt[:1])[0]
        c = temb + emb(c0, tt[:1])[0]
        out[f"t={t}"] = {"|E_high(flip1)-E_high(flip0)|": float((h1 - h0).norm()),
                         "|E_high(flip0)|": float(h0.norm()), "|E_high - null|": float((h0 - emb.high.null).norm()),
                         "|null|": float(emb.high.null.norm()), "|t_emb|": float(temb.norm()), "|c|": float(c.norm())}
    return out


@torch.no_grad()
def velocity_check(model, cfg, text, n: int = 64) -> dict:
    from ldmkit.conditioning import Conditioning
    from ldmkit.eval.shapes import all_captions
    from ldmkit.data import build_dataset
    from ldmkit.sampling import default_control

    ds = build_dataset(cfg.data, seed=cfg.seed)
    caps = [c for c, *_ in all_captions(ds) if c.endswith(("left", "right"))][:n]
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(caps), 3, size, size), generator=g)
    enc = text(caps, training=False)
    swapped = text([c.replace("left", "@").replace("right", "left").replace("@", "right") for c in caps], training=False)
    n = len(caps)
    base = default_control(n, size)
    variants = {"flip 0 -> 1": (enc, default_control(n, size, flip=True)),
                "caption left <-> right": (swapped, base),
                f"orig_size {size // 4} -> {size * 4}": (enc, default_control(n, size, orig_size=(size * 4,) * 2)),
                "crop (0,0) -> (2,2)": (enc, default_control(n, size, crop=(2.0, 2.0)))}
    out = {}
    for t in (0.2, 0.5, 0.8):
        tt = torch.full((n,), t)
        small = default_control(n, size, orig_size=(size // 4,) * 2)
        v0 = model(x, tt, Conditioning(control=base, **enc))
        row = {}
        for name, (e, ctrl) in variants.items():
            ref = model(x, tt, Conditioning(control=small, **enc)) if name.startswith("orig_size") else v0
            v1 = model(x, tt, Conditioning(control=ctrl, **e))
            row[name] = float((v1 - ref).norm() / ref.norm())
        out[f"t={t}"] = row
    return out


def sample_check(model, cfg, text, per_caption: int = 1) -> dict:
    from ldmkit.data import build_dataset
    from ldmkit.eval.shapes import evaluate_flip

    ds = build_dataset(cfg.data, seed=cfg.seed)
    from ldmkit.sampling import SampleSettings

    r = evaluate_flip(model, ds, text, per_caption=per_caption, seed=cfg.seed + 7,
                      settings=SampleSettings.from_config(cfg, model))
    return {k: r[k] for k in ("left_right_flip0", "left_right_flip1", "flip_response", "max_pixel_diff", "n")}


def main() -> None:
    from ldmkit.config import from_dict
    from ldmkit.text import build_text_conditioner
    from ldmkit.train.checkpoint import load_model, resolve_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--data-samples", type=int, default=2000)
    p.add_argument("--no-samples", action="store_true", help="skip the (slow) sampling check")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    report = {}
    data_done = False
    for path in args.checkpoint:
        ckpt = resolve_checkpoint(path)
        entry = {}
        for ema in (True, False):
            model, cfg_dict = load_model(ckpt, ema=ema)
            cfg = from_dict(cfg_dict)
            if not data_done:
                report["data"] = data_check(cfg, args.data_samples)
                print("data:", json.dumps(report["data"]))
                data_done = True
            text = build_text_conditioner(cfg.cond.text)
            key = "ema" if ema else "raw"
            entry[key] = {"embedding": embedding_check(model, cfg), "velocity": velocity_check(model, cfg, text)}
            if not args.no_samples:
                entry[key]["samples"] = sample_check(model, cfg, text)
            print(f"{ckpt} [{key}]:", json.dumps(entry[key], indent=1))
        report[str(ckpt)] = entry
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
