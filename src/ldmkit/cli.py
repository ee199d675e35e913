"""The `ldmkit` command line: train, sample, eval, plot, config, models."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ldmkit.config import ConfigError, load_config


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`config` is optional: a first positional that looks like key=value is an override."""
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    # `--resume run.dir=x` would otherwise swallow the override as the resume value.
    if getattr(args, "resume", None) and "=" in args.resume:
        overrides.append(args.resume)
        args.resume = "auto"
    return config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from ldmkit.train.trainer import RunDirError, train

    config, overrides = _split_config_and_overrides(args)
    if config is None and args.resume:  # continue a run with the config it was started with
        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")), None)
        if run_dir is None:
            raise ConfigError("--resume without a config file needs run.dir=PATH")
        config = str(Path(run_dir) / "config.yaml")
        if not Path(config).is_file():
            raise RunDirError(f"cannot resume: {config!r} does not exist (is {run_dir!r} a run directory?)")
    cfg = load_config(config, overrides)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def _load_for_sampling(args: argparse.Namespace):
    from ldmkit.config import from_dict
    from ldmkit.train.checkpoint import load_model, resolve_checkpoint
    from ldmkit.train.trainer import pick_device

    device = pick_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg_dict = load_model(ckpt, ema=not args.no_ema, device=device)
    cfg = from_dict(cfg_dict)
    return ckpt, model, cfg, device


def _sample_settings(args: argparse.Namespace, cfg) -> dict:
    s = cfg.sample
    return {
        "sampler": args.sampler or s.sampler,
        "steps": args.steps if args.steps is not None else s.steps,
        "guidance": args.guidance if args.guidance is not None else s.guidance,
        "shift": args.shift if args.shift is not None else s.shift,
    }


def _class_id(value: str, dataset) -> int:
    if value.lstrip("-").isdigit():
        cid = int(value)
        if not 0 <= cid < dataset.num_classes:
            raise ConfigError(f"--class {cid} is out of range: this model has classes 0..{dataset.num_classes - 1}")
        return cid
    names = list(dataset.class_names)
    if value in names:
        return names.index(value)
    import difflib

    close = difflib.get_close_matches(value, names, n=3)
    raise ConfigError(f"--class {value!r} is not a class of this model"
                      + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                         f"; classes: {', '.join(names)}"))


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ldmkit.autoencoders import build_autoencoder, to_uint8
    from ldmkit.data import build_dataset
    from ldmkit.sampling import generate, make_grid

    ckpt, model, cfg, device = _load_for_sampling(args)
    dataset = build_dataset(cfg.data, seed=cfg.seed)
    ae = build_autoencoder(cfg.autoencoder.name).to(device)
    if args.cls is None:  # one of every class, cycling
        classes = torch.arange(args.num) % dataset.num_classes
    else:
        classes = torch.full((args.num,), _class_id(args.cls, dataset), dtype=torch.long)
    size = cfg.data.image_size // ae.downsample
    settings = _sample_settings(args, cfg)
    x = generate(model, classes, (ae.channels, size, size), seed=args.seed, device=device,
                 progress=True, **settings)
    images = to_uint8(ae.decode(x.to(device))).numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, ncol=args.ncol or math.ceil(math.sqrt(args.num))).save(out)
    what = "every class" if args.cls is None else f"class {dataset.class_names[int(classes[0])]!r}"
    print(f"Wrote {args.num} samples ({what}; {settings['sampler']}, {settings['steps']} steps, "
          f"guidance {settings['guidance']}) from {ckpt} to {out}")
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.data import build_dataset
    from ldmkit.eval.shapes import evaluate_generation, format_report

    ckpt, model, cfg, device = _load_for_sampling(args)
    if cfg.data.name != "shapes":
        raise ConfigError(f"eval shapes needs a model trained on data.name='shapes', not {cfg.data.name!r}")
    dataset = build_dataset(cfg.data, seed=cfg.seed)
    ae = build_autoencoder(cfg.autoencoder.name).to(device)
    settings = _sample_settings(args, cfg)
    result = evaluate_generation(model, dataset, per_class=args.per_class, seed=args.seed,
                                 device=device, decode=ae.decode, progress=True, **settings)
    result["checkpoint"] = str(ckpt)
    result["ema"] = not args.no_ema
    print(format_report(result))
    out = Path(args.out) if args.out else ckpt / "eval_shapes.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"Wrote {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ldmkit.plot import plot_metrics

    print(f"Wrote {plot_metrics(args.run_dir, args.out)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from ldmkit.config import to_dict

    config, overrides = _split_config_and_overrides(args)
    print(yaml.safe_dump(to_dict(load_config(config, overrides)), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ldmkit.models import list_models
    from ldmkit.models.catalog import table

    names = [n for n in list_models() if not args.filter or args.filter in n]
    if not names:
        raise ConfigError(f"no model name contains {args.filter!r}")
    print(table(names, tuple(args.resolutions)))
    print("\nAs published: class-conditional on 1000 classes (sd3-medium, sdxl: text), DiT/MDT/PixArt with "
          "learned variance, f8 x 4 latents (ldm-4-g: f4 x 3, sd3-medium: f8 x 16). GFLOPs are real FLOPs (a "
          "multiply-add counts 2) of one forward pass per image; text presets with 77 tokens. See docs/models.md.")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ldmkit.models import convert
    from ldmkit.train.checkpoint import load_model, save_weights

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty")
    if args.direction == "to-diffusers":
        model, _ = load_model(args.source, ema=not args.no_ema)
        dm = convert.to_diffusers(model)
        dm.save_pretrained(str(out))
        print(f"Wrote diffusers {type(dm).__name__} ({'raw' if args.no_ema else 'EMA'} weights of "
              f"{args.source}) to {out}")
    elif args.direction == "from-diffusers":
        model = convert.from_diffusers(convert.load_diffusers(args.source, args.subfolder))
        save_weights(model, out)
        print(f"Wrote ldmkit {model.arch} weights to {out} (model.json + model.safetensors)")
    else:  # from-official-dit
        from ldmkit.models.convert_dit import from_official

        state = torch.load(args.source, map_location="cpu", weights_only=True)
        save_weights(from_official(state), out)
        print(f"Wrote ldmkit dit weights to {out} (model.json + model.safetensors)")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--sampler", choices=["euler", "heun"], help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--shift", type=float, help="time-grid shift (default: the run's sample.shift)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train a model. Overrides are dotted key=value pairs, e.g. "
                                   "train.steps=100 model.name=dit-b/4 run.dir=runs/x seed=1.")
    p.add_argument("config", nargs="?", help="YAML recipe (default: the built-in defaults; with --resume: "
                                             "run.dir's config.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue run.dir: 'auto' (newest complete checkpoint) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample an image grid from a checkpoint")
    _add_sampling_args(p)
    p.add_argument("--class", dest="cls", help="class id or name (e.g. 3 or 'red circle'); default: all classes")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--ncol", type=int, help="grid columns (default: square grid)")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="metric", required=True)
    e = esub.add_parser("shapes", help="analytic colour/shape accuracy of samples of a model trained on shapes")
    _add_sampling_args(e)
    e.add_argument("--per-class", type=int, default=32, help="samples per class")
    e.add_argument("--out", help="JSON path (default: CHECKPOINT/eval_shapes.json)")
    e.set_defaults(func=cmd_eval_shapes)

    p = sub.add_parser("plot", help="draw a run's metric curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list the named models with parameter counts and GFLOPs")
    p.add_argument("filter", nargs="?", help="only names containing this text (e.g. dit-xl)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="pixel resolutions")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert weights to/from diffusers or the official DiT layout")
    p.add_argument("direction", choices=["to-diffusers", "from-diffusers", "from-official-dit"])
    p.add_argument("source", help="to-diffusers: an ldmkit checkpoint, run or weights directory; "
                                  "from-diffusers: a diffusers model directory or hub id; "
                                  "from-official-dit: a facebookresearch/DiT .pt file")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--subfolder", help="from-diffusers: subfolder of a pipeline (e.g. transformer, unet)")
    p.add_argument("--no-ema", action="store_true", help="to-diffusers: the raw weights, not the EMA")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ == "RunDirError":
            print(f"ldmkit: error: {e}", file=sys.stderr)
            return 2
        if type(e).__name__ == "TrainingDiverged":
            print(f"ldmkit: training stopped: {e}", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
