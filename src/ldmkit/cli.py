"""The `ldmkit` command line: train, encode, sample, eval, plot, config, models."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import traceback
from pathlib import Path

from ldmkit.config import SAMPLERS, ConfigError, load_config
from ldmkit.errors import TrainingDiverged, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``ldmkit: error: ...`` (``--help`` shows the usage)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"ldmkit: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind: type, low: float | None = None, strict: bool = False, high: float | None = None):
    """An argparse type: an int or a finite float within [low, high] (``strict``: above ``low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)


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


def cmd_encode(args: argparse.Namespace) -> int:
    from ldmkit.encode import encode_dataset

    config, overrides = _split_config_and_overrides(args)
    cfg = load_config(config, overrides)
    encode_dataset(cfg, out=args.out, batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                   device=args.device, progress=not args.no_progress, cache_text=not args.no_text,
                   posterior=args.posterior)
    return 0


def _load_for_sampling(args: argparse.Namespace):
    from ldmkit.config import from_dict
    from ldmkit.train.checkpoint import load_model, resolve_checkpoint
    from ldmkit.train.build import pick_device

    device = pick_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg_dict = load_model(ckpt, ema=not args.no_ema, device=device)
    cfg = from_dict(cfg_dict)
    return ckpt, model, cfg, device


def pick(value, default):
    """A command-line flag's value, or the run's setting when the flag was not given."""
    return default if value is None else value


def _sample_settings(args: argparse.Namespace, cfg, model):
    """The run's ``SampleSettings`` with the command-line flags applied."""
    from ldmkit.sampling import SampleSettings

    run = SampleSettings.from_config(cfg, model)
    fits = SAMPLERS["flow" if run.diffusion is None else "ddpm"]
    if args.sampler is not None and args.sampler not in fits:
        raise ConfigError(f"--sampler {args.sampler}: this model was trained with diffusion.objective="
                          f"{cfg.diffusion.objective!r}; use one of {fits}")
    # --shift replaces sample.shift; a resolution scale still multiplies it
    shift = run.shift if args.shift is None else run.shift / cfg.sample.shift * args.shift
    return run.replace(sampler=args.sampler or run.sampler, steps=pick(args.steps, run.steps),
                       guidance=pick(args.guidance, run.guidance),
                       control_guidance=pick(args.control_guidance, run.control_guidance),
                       interval=tuple(pick(args.interval, run.interval)), eta=pick(args.eta, run.eta), shift=shift)


def _pair(text: str, what: str) -> tuple[float, float]:
    """ "H,W" -> (H, W) for --size / --crop / --interval, each checked for its flag."""
    parts = text.replace("x", ",").split(",")
    try:
        a, b = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 64,64, got {text!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    if what == "--size" and min(a, b) <= 0:
        raise argparse.ArgumentTypeError(f"the original size H,W must be > 0, got {text!r}")
    if what == "--crop" and min(a, b) < 0:
        raise argparse.ArgumentTypeError(f"the crop TOP,LEFT must be >= 0, got {text!r}")
    if what == "--interval" and not 0 <= a < b <= 1:
        raise argparse.ArgumentTypeError(f"need LO,HI with 0 <= LO < HI <= 1 (t = 1 is noise), got {text!r}")
    return a, b


def _image_path(text: str) -> str:
    if not text.lower().endswith(IMAGE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"expected an image file name ending in {', '.join(IMAGE_SUFFIXES)}, "
                                         f"got {text!r}")
    return text


def _sizes(text: str) -> list[int]:
    return [POSITIVE_INT(v) for v in text.split(",")]


def _control_settings(args: argparse.Namespace, cfg) -> dict:
    """Keyword arguments of ``default_control``: the flags, else the run's sample.* values."""
    s = cfg.sample
    return {"orig_size": pick(args.size, s.orig_size), "crop": pick(args.crop, s.crop), "flip": pick(args.flip, s.flip)}


def _text_conditioner(cfg, device):
    if cfg.cond.semantic != "text":
        return None
    from ldmkit.text import build_text_conditioner

    return build_text_conditioner(cfg.cond.text, device)


def _class_names(ckpt: Path, cfg, model) -> list[str]:
    """The class names of a class model: stored in its checkpoint; for checkpoints written before they
    were, the procedural shapes' names or the class ids (no dataset is opened)."""
    from ldmkit.train.checkpoint import read_class_names

    names = read_class_names(ckpt)
    if names is None and cfg.data.name == "shapes":
        from ldmkit.data import build_dataset

        names = list(build_dataset(cfg.data, seed=cfg.seed).class_names)
    return names if names is not None else [str(i) for i in range(getattr(model, "num_classes", 0))]


def _class_id(value: str, names: list[str]) -> int:
    if value.lstrip("-").isdigit():
        cid = int(value)
        if not 0 <= cid < len(names):
            raise ConfigError(f"--class {cid} is out of range: this model has classes 0..{len(names) - 1}")
        return cid
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
    from ldmkit.sampling import conditions_for, default_control, generate, make_grid

    ckpt, model, cfg, device = _load_for_sampling(args)
    ae = build_autoencoder(cfg.autoencoder, device=device)
    text = _text_conditioner(cfg, device)
    control = default_control(args.num, cfg.data.image_size, **_control_settings(args, cfg))
    if text is not None:
        if args.cls is not None:
            raise ConfigError("--class: this model is text-conditional; use --prompt")
        prompts = args.prompt or list(cfg.sample.prompts)
        if not prompts:
            raise ConfigError("this model is text-conditional: give --prompt TEXT (repeat it for several prompts)")
        prompts = [prompts[i % len(prompts)] for i in range(args.num)]  # cycle through the prompts
        cond, uncond = conditions_for(control, prompts=prompts, text=text)
        what = f"prompt{'s' if len(set(prompts)) > 1 else ''} {', '.join(repr(p) for p in dict.fromkeys(prompts))}"
    else:
        if args.prompt:
            raise ConfigError("--prompt: this model is class-conditional; use --class")
        names = _class_names(ckpt, cfg, model)
        if args.cls is None:  # one of every class, cycling
            classes = torch.arange(args.num) % len(names)
        else:
            classes = torch.full((args.num,), _class_id(args.cls, names), dtype=torch.long)
        cond, uncond = conditions_for(control, class_ids=classes)
        what = "every class" if args.cls is None else f"class {names[int(classes[0])]!r}"
    size = cfg.data.image_size // ae.downsample
    settings = _sample_settings(args, cfg, model)
    x = generate(model, cond, (ae.channels, size, size), settings, uncond=uncond, seed=args.seed, device=device,
                 progress=True)
    images = to_uint8(ae.decode(x.to(device))).numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, ncol=args.ncol or math.ceil(math.sqrt(args.num))).save(out)
    c = _control_settings(args, cfg)
    print(f"Wrote {args.num} samples ({what}; {settings.resolved().sampler}, {settings.steps} steps, guidance "
          f"{settings.guidance}, control guidance {settings.control_guidance}; orig_size "
          f"{c['orig_size'] or (cfg.data.image_size,) * 2}, crop {tuple(c['crop'])}, flip {int(c['flip'])}) "
          f"from {ckpt} to {out}")
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.data import build_dataset
    from ldmkit.eval.shapes import evaluate_captions, evaluate_generation, format_report

    ckpt, model, cfg, device = _load_for_sampling(args)
    if cfg.data.name != "shapes":
        raise ConfigError(f"eval shapes needs a model trained on data.name='shapes', not {cfg.data.name!r}")
    dataset = build_dataset(cfg.data, seed=cfg.seed)
    ae = build_autoencoder(cfg.autoencoder, device=device)
    settings = _sample_settings(args, cfg, model)
    text = _text_conditioner(cfg, device)
    common = dict(seed=args.seed, device=device, decode=ae.decode, progress=True,
                  control=_control_settings(args, cfg), settings=settings)
    if text is None:
        result = evaluate_generation(model, dataset, per_class=args.per_class, **common)
    else:
        result = evaluate_captions(model, dataset, text, per_caption=args.per_caption, **common)
    result["checkpoint"] = str(ckpt)
    result["ema"] = not args.no_ema
    print(format_report(result))
    out = Path(args.out) if args.out else ckpt / "eval_shapes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"Wrote {out}")
    return 0


def cmd_eval_disentangle(args: argparse.Namespace) -> int:
    from ldmkit.eval.disentangle import evaluate_disentanglement, format_disentanglement

    ckpt, model, cfg, device = _load_for_sampling(args)
    control = _control_settings(args, cfg)
    if cfg.cond.semantic == "text" and args.cls is not None:
        raise ConfigError("--class: this model is text-conditional; use --prompt")
    class_id = None if args.cls is None else _class_id(args.cls, _class_names(ckpt, cfg, model))
    result, figure = evaluate_disentanglement(
        model, cfg, device=device, num=args.num, sizes=args.sizes, seed=args.seed, class_id=class_id,
        prompts=args.prompt, crop=control["crop"], flip=control["flip"], lpips_backbone=args.lpips_backbone,
        lpips_lin=args.lpips_lin, progress=True, settings=_sample_settings(args, cfg, model))
    result.update(checkpoint=str(ckpt), ema=not args.no_ema)
    if result["note"]:
        print(f"note: {result['note']}")
    print(format_disentanglement(result))
    out = Path(args.out) if args.out else ckpt / "eval_disentangle.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    figure.save(out.with_suffix(".png"))
    print(f"Wrote {out} and {out.with_suffix('.png')} (rows: samples, columns: size conditions {result['sizes']})")
    return 0


def _captions(args: argparse.Namespace, cfg, dataset) -> list[str] | None:
    """The caption set of a text model: --captions FILE (one per line), else the shapes captions."""
    if cfg.cond.semantic != "text":
        return None
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            raise ConfigError(f"--captions: {str(path)!r} does not exist")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--captions: {str(path)!r} holds no caption")
        return lines
    if cfg.data.name == "shapes":
        from ldmkit.eval.shapes import all_captions

        return [c for c, *_ in all_captions(dataset)]
    raise ConfigError("--captions FILE is needed for a text model (one caption per line)")


def cmd_eval_fid(args: argparse.Namespace) -> int:
    from dataclasses import asdict, fields

    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.config import to_dict
    from ldmkit.data import build_dataset
    from ldmkit.eval import dinov2 as dino
    from ldmkit.eval.inception import InceptionFeatures, load_fid_inception, resolve_inception_weights
    from ldmkit.eval.protocol import (Featurizer, Protocol, Reference, aggregate_seed_sets, condition_maker,
                                      featurize_chunks, generate_eval_set, merge_features, merge_parts,
                                      score_features, seed_set_seed, weights_tag, write_result)
    from ldmkit.model_card import eval_card, write_card
    from ldmkit.train import distributed as D

    if args.num_samples < 2:
        raise ConfigError(f"--num-samples must be >= 2, got {args.num_samples}")
    if not Path(args.ref).is_file():
        raise ConfigError(f"--ref: reference statistics {args.ref!r} do not exist (make them with `ldmkit eval "
                          "stats`, or download an ADM reference batch, see docs/evaluation.md)")
    # fail before hours of sampling, not after: Inception must exist; DINOv2 must if it was asked for by path
    weights = resolve_inception_weights(args.inception)
    load_fid_inception(weights)  # a wrong or damaged file fails now, not after hours of sampling
    if args.no_dinov2 and args.dinov2:
        raise ConfigError("--dinov2 and --no-dinov2 contradict each other")
    dinov2_weights = None if args.no_dinov2 else dino.find_dinov2_weights(args.dinov2)
    dist = D.init_distributed(args.device)
    args.device = str(dist.device)
    try:
        ckpt, model, cfg, device = _load_for_sampling(args)
        dataset = build_dataset(cfg.data, seed=cfg.seed) if cfg.data.name == "shapes" else None  # its captions
        ae = build_autoencoder(cfg.autoencoder, device=device)
        text = _text_conditioner(cfg, device)
        settings = _sample_settings(args, cfg, model)
        captions = _captions(args, cfg, dataset)
        if args.clip and captions is None:
            raise ConfigError("--clip: CLIPScore needs a text model (this one is class-conditional)")
        make_cond, conditioning = condition_maker(model, cfg.data.image_size, args.num_samples, text=text,
                                                  captions=captions, control=_control_settings(args, cfg))
        record = settings.record()
        num_chunks = (args.num_samples + args.chunk - 1) // args.chunk
        protocol = Protocol(
            num_samples=args.num_samples, seed=args.seed, sampler=record["sampler"], steps=record["steps"],
            guidance=record["guidance"], control_guidance=record["control_guidance"], interval=record["interval"],
            shift=record["shift"], eta=record["eta"], diffusion=record["diffusion"], ema=not args.no_ema,
            conditioning=conditioning, image_size=cfg.data.image_size, chunk=args.chunk,
            reference=str(Path(args.ref).resolve()), inception=str(weights),
            extra={"control": {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in _control_settings(args, cfg).items()},
                   "clip_model": args.clip},
            seed_sets=args.seed_sets,
            seed_scheme=("chunk c uses seed + c" if args.seed_sets == 1 else
                         f"set k (0..{args.seed_sets - 1}), chunk c: seed + k * {num_chunks} + c (C = {num_chunks} "
                         "chunks per set): no seed is shared between sets, and set 0 is the single-set evaluation"),
            dinov2="" if dinov2_weights is None else str(dinov2_weights),
            dinov2_preprocessing="" if dinov2_weights is None else dino.PREPROCESSING)
        out = Path(args.out) if args.out else ckpt / f"eval_fid_{args.num_samples}"
        saved = out / "protocol.json"
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if saved.is_file():  # resuming: the chunks on disk must come from the same protocol
                old, new = json.loads(saved.read_text()), asdict(protocol)
                defaults = {f.name: f.default for f in fields(Protocol)}  # keys added since the file was written
                weights_only = ("inception", "dinov2", "dinov2_preprocessing", "features")  # cached by weights tag
                diff = sorted(k for k in new if old.get(k, defaults.get(k)) != new[k] and k not in weights_only)
                if diff:
                    raise ConfigError(f"{str(out)!r} holds an evaluation with a different {', '.join(diff)}; "
                                      "use another --out")
            saved.write_text(json.dumps(asdict(protocol), indent=2))
        D.barrier(dist)
        set_dirs = [out] if args.seed_sets == 1 else [out / f"set_{k}" for k in range(args.seed_sets)]
        latent = (ae.channels, cfg.data.image_size // ae.downsample, cfg.data.image_size // ae.downsample)
        paths = [generate_eval_set(model, d, args.num_samples, cfg.data.image_size, latent, settings,
                                   make_cond=make_cond, decode=ae.decode, seed=seed_set_seed(args.seed, k, num_chunks),
                                   chunk=args.chunk, batch_size=args.batch_size, device=device, rank=dist.rank,
                                   world_size=dist.world_size)
                 for k, d in enumerate(set_dirs)]
        # every rank featurises its own chunks (the features do not depend on the number of ranks)
        featurizer = Featurizer(  # (one progress bar over the chunks, not one per chunk)
            InceptionFeatures(weights=weights, device=device, batch_size=args.inception_batch, progress=False),
            None if dinov2_weights is None else dino.DINOv2Features(dinov2_weights, device=device,
                                                                    batch_size=args.inception_batch, progress=False),
            inception_score=args.inception_score, tag=weights_tag(weights, dinov2_weights))
        feature_paths = [featurize_chunks(p, featurizer, rank=dist.rank, world_size=dist.world_size) for p in paths]
        D.barrier(dist)
        if not dist.is_main:
            return 0
        reference = Reference(args.ref, featurizer, cache_dir=out)
        per_set = []
        for k, d in enumerate(set_dirs):
            samples = merge_parts(paths[k], d / "samples.npz")
            metrics = score_features(merge_features(feature_paths[k]), reference, with_pr=not args.no_pr,
                                     with_is=args.inception_score, stats_out=d / "samples_stats.npz")
            if args.clip:  # CLIPScore = 100 max(cos, 0) of every sample with its own caption, averaged
                import numpy as np

                from ldmkit.eval.clip_score import CLIPScorer

                with np.load(samples) as npz:
                    images, idx = npz["arr_0"], npz["arr_1"]
                scores = CLIPScorer.from_pretrained(args.clip, device=device).score(
                    images, [captions[int(i)] for i in idx], progress=True)
                metrics["clip_score"] = float(scores.mean())
            per_set.append(metrics)
        metrics = per_set[0] if args.seed_sets == 1 else aggregate_seed_sets(per_set)
        protocol.reference_count = metrics.pop("reference_count")
        if reference.notes:
            protocol.extra["reference_statistics"] = reference.notes
        result = write_result(out, metrics, protocol, str(ckpt))
        card = write_card(out / "MODEL_CARD.md", eval_card(model, checkpoint=str(ckpt), metrics=metrics,
                                                           protocol=asdict(protocol), config=to_dict(cfg)))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        sets = f" x {args.seed_sets} seed sets (means)" if args.seed_sets > 1 else ""
        print(f"{shown} ({metrics['num_samples']} samples{sets}; {protocol.sampler} {protocol.steps} steps, guidance "
              f"{protocol.guidance}; reference {args.ref})")
        for name, why in metrics.get("skipped", {}).items():
            print(f"note: {name} skipped: {why}")
        where = "samples.npz" if args.seed_sets == 1 else "set_*/samples.npz"
        print(f"Wrote {out / where} (ADM layout: arr_0 images, arr_1 labels), {result} and {card}")
        return 0
    finally:
        D.shutdown()


def cmd_eval_stats(args: argparse.Namespace) -> int:
    import numpy as np

    from ldmkit.eval import dinov2 as dino
    from ldmkit.eval.fid import NpzImageBatches, stats_from_features, stats_from_folder
    from ldmkit.files import atomic_write
    from ldmkit.eval.inception import InceptionFeatures
    from ldmkit.eval.protocol import Featurizer
    from ldmkit.train.build import pick_device

    device = pick_device(args.device)
    source = Path(args.source)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {str(out)!r} exists; choose another path or pass --overwrite")
    if args.no_dinov2 and args.dinov2:
        raise ConfigError("--dinov2 and --no-dinov2 contradict each other")
    dinov2_weights = None if args.no_dinov2 else dino.find_dinov2_weights(args.dinov2)
    featurizer = Featurizer(
        InceptionFeatures(weights=args.inception, device=device, batch_size=args.batch_size),
        None if dinov2_weights is None else dino.DINOv2Features(dinov2_weights, device=device,
                                                                batch_size=args.batch_size))
    extra: dict = {}
    side: dict = {}

    def pool_and_side(images) -> np.ndarray:
        """Pool features (what the folder reader expects); the spatial and DINOv2 ones are kept aside."""
        feats = featurizer(images)
        side.update({k: v for k, v in feats.items() if k != "pool"})
        return feats["pool"]

    if source.is_dir():
        stats, report = stats_from_folder(source, features_fn=pool_and_side)
        print(f"{report.num_used} images used, {report.num_skipped} skipped of {report.num_files} in {source}")
        for path, reason in report.skipped[:20]:
            print(f"  skipped {path}: {reason}")
        feats = None
    elif source.suffix == ".npz" and source.is_file():
        feats = pool_and_side(NpzImageBatches(source, "arr_0", 500))
    elif source.suffix in (".yaml", ".yml") and source.is_file():
        import torch

        from ldmkit.autoencoders import to_uint8
        from ldmkit.data import build_dataset

        cfg = load_config(source, args.overrides)
        dataset = build_dataset(cfg.data, seed=cfg.seed)
        n = min(args.num, len(dataset))  # the first n samples, epoch 0's augmentation
        images = np.concatenate([to_uint8(torch.stack([dataset.get(i, 0)["image"] for i in range(j, min(n, j + 500))]))
                                 .numpy() for j in range(0, n, 500)])
        feats = pool_and_side(images)
        extra["arr_0"] = images  # an ADM-style reference batch: images for precision/recall too
    else:
        raise ConfigError(f"eval stats: {str(source)!r} is not an image folder, an .npz with arr_0 or a YAML recipe")
    if feats is not None:
        stats = stats_from_features(feats)
        extra["features"] = feats.astype(np.float32)
    spatial = stats_from_features(side["spatial"])
    extra["mu_s"], extra["sigma_s"] = spatial.mu, spatial.sigma  # ADM's sFID statistics
    if "dinov2" in side:
        dstats = stats_from_features(side["dinov2"])
        extra["mu_dinov2"], extra["sigma_dinov2"] = dstats.mu, dstats.sigma
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n or 0), **extra))
    kept = ["features"] if "features" in extra else []
    kept += ["images"] if "arr_0" in extra else []
    print(f"Wrote {out}: mu, sigma (FID), mu_s, sigma_s (sFID)" + (", mu_dinov2, sigma_dinov2 (FD-DINOv2)"
                                                                   if "dinov2" in side else "")
          + f" of {stats.n} images" + (f" (+ {', '.join(kept)})" if kept else ""))
    if "dinov2" not in side and not args.no_dinov2:
        print(f"note: no DINOv2 weights ({dino.DINOV2_FILE}) found: no FD-DINOv2 statistics (docs/evaluation.md)")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from ldmkit.ablate import run_ablation

    devices = [d for d in (args.devices or "").split(",") if d.strip()]
    out = run_ablation(args.file, args.overrides, out=args.out, disentangle_num=args.disentangle_num,
                       progress=not args.no_progress and args.jobs == 1, jobs=args.jobs, devices=devices)
    print((out / "results.md").read_text())
    print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ldmkit.train.metrics import plot_metrics

    print(f"Wrote {plot_metrics(args.run_dir, args.out)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from ldmkit.config import to_dict

    config, overrides = _split_config_and_overrides(args)
    print(yaml.safe_dump(to_dict(load_config(config, overrides)), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    # Torch-free unless --count: the presets and the closed forms do not import it.
    from ldmkit.models.catalog import table
    from ldmkit.models.presets import list_models

    names = [n for n in list_models() if not args.filter or args.filter in n]
    if not names:
        raise ConfigError(f"no model name contains {args.filter!r}")
    try:
        print(table(names, tuple(args.resolutions), count=args.count))
    except ValueError as e:  # a resolution the model cannot take (e.g. not divisible by its patch size)
        raise ConfigError(f"--resolutions {' '.join(map(str, args.resolutions))}: {e}") from e
    how = "counted with FlopCounterMode" if args.count else "closed forms, equal to FlopCounterMode's count"
    print("\nAs published: class-conditional on 1000 classes (sd3-medium, sdxl: text), DiT/MDT/PixArt with "
          "learned variance, f8 x 4 latents (ldm-4-g: f4 x 3, sd3-medium: f8 x 16). GFLOPs are real FLOPs (a "
          f"multiply-add counts 2) of one forward pass per image ({how}); text presets with 77 tokens. "
          "See docs/models.md.")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ldmkit.train.checkpoint import save_weights

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty")
    if args.direction != "from-official-dit" and (args.num_heads is not None or args.num_classes is not None):
        raise ConfigError("--num-heads and --num-classes apply to from-official-dit only")
    if args.pipeline and args.direction != "to-diffusers":
        raise ConfigError("--pipeline applies to to-diffusers only")
    try:
        if args.direction == "to-diffusers":
            from ldmkit.export import export_to_diffusers

            result = export_to_diffusers(args.source, out, pipeline=args.pipeline, ema=not args.no_ema)
            extra = result.extra_files
            print(f"Wrote diffusers {result.diffusers_class} ({'raw' if args.no_ema else 'EMA'} weights of "
                  f"{args.source}) to {out}"
                  + (f", with its class table in {', '.join(extra)}" if any(f.endswith(".safetensors") for f in extra)
                     else f", with {', '.join(extra)}" if extra else "")
                  + (f"; scheduler {result.scheduler}" if result.scheduler else "") + "; model card README.md")
            for note in result.notes:
                print(f"note: {note}")
        elif args.direction == "from-diffusers":
            from ldmkit.export import load_as_ldmkit

            model = load_as_ldmkit(args.source, args.subfolder)
            save_weights(model, out)
            print(f"Wrote ldmkit {model.arch} weights to {out} (model.json + model.safetensors)")
        else:  # from-official-dit
            from ldmkit.models.convert_dit import load_official

            if not Path(args.source).is_file():
                raise ConfigError(f"{args.source!r} does not exist")
            model, sources = load_official(args.source, num_heads=args.num_heads, num_classes=args.num_classes)
            save_weights(model, out)
            kw = model.init_kwargs
            print(f"Wrote ldmkit dit weights to {out} (model.json + model.safetensors): width {kw['hidden_size']}, "
                  f"{kw['num_heads']} heads (from {sources['num_heads']}), {kw['num_classes']} classes (from "
                  f"{sources.get('num_classes') or sources.get('has_null_class')})")
    except ValueError as e:  # a model or file the conversion cannot express: one line, no traceback
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest checkpoint)")
    p.add_argument("--sampler", choices=[*SAMPLERS["flow"], *SAMPLERS["ddpm"]],
                   help="default: the run's sample.sampler (flow: euler/heun; ddpm: ddim/ancestral)")
    p.add_argument("--eta", type=_number(float, 0, high=1),
                   help="ddim: 0 deterministic, 1 stochastic (default: sample.ddim_eta)")
    p.add_argument("--steps", type=POSITIVE_INT, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=_number(float, 0),
                   help="semantic guidance scale w_sem (1 = none; default: the run's)")
    p.add_argument("--control-guidance", type=_number(float, 0),
                   help="control guidance scale w_ctrl (1 = ordinary guidance; default: the run's)")
    p.add_argument("--interval", type=lambda v: _pair(v, "--interval"),
                   help="guide only for t in LO,HI (t = 1 noise), e.g. 0.1,0.9")
    p.add_argument("--size", type=lambda v: _pair(v, "--size"),
                   help="original-size condition H,W in pixels (default: the target size)")
    p.add_argument("--crop", type=lambda v: _pair(v, "--crop"), help="crop condition TOP,LEFT in pixels (default 0,0)")
    p.add_argument("--flip", type=int, choices=[0, 1], help="flip condition (default 0)")
    p.add_argument("--shift", type=_number(float, 0, strict=True),
                   help="time-grid shift (default: the run's sample.shift)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldmkit", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
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

    p = sub.add_parser("encode", help="precompute a run's latents (and text encodings) into a cache",
                       description="Encode data.* with autoencoder.* (and cond.text.* for text models) into "
                                   "sharded safetensors at data.cache (or --out): posterior mean and std of each "
                                   "crop and its mirror. Resumable: run it again to finish an interrupted job; "
                                   "parallel with torchrun. Train from it with the same config and data.cache set.")
    p.add_argument("config", nargs="?", help="the run's YAML recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cache=/data/latents")
    p.add_argument("--out", help="cache directory (default: data.cache)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per autoencoder call (per process)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=10_000,
                   help="samples per output shard of an image folder (WebDataset: one output shard per tar)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage precision")
    p.add_argument("--posterior", choices=["mean_std", "mean"], default="mean_std",
                   help="mean_std: sample a fresh latent at every read; mean: the mean only (half the disk)")
    p.add_argument("--no-text", action="store_true",
                   help="text models: store the captions only and encode them during training (for large "
                        "encoders, whose token caches can dwarf the latents)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("sample", help="sample an image grid from a checkpoint")
    _add_sampling_args(p)
    p.add_argument("--class", dest="cls", help="class id or name (e.g. 3 or 'red circle'); default: all classes")
    p.add_argument("--prompt", action="append", help="text models: a prompt (repeat for several; samples cycle)")
    p.add_argument("--num", type=POSITIVE_INT, default=16)
    p.add_argument("--ncol", type=POSITIVE_INT, help="grid columns (default: square grid)")
    p.add_argument("--out", type=_image_path, default="samples.png", help="image file (.png, .jpg, ...)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="metric", required=True)
    e = esub.add_parser("shapes", help="analytic colour/shape accuracy of samples of a model trained on shapes")
    _add_sampling_args(e)
    e.add_argument("--per-class", type=POSITIVE_INT, default=32, help="samples per class (class-conditional models)")
    e.add_argument("--per-caption", type=POSITIVE_INT, default=2,
                   help="samples per caption (text models; 162 captions)")
    e.add_argument("--out", help="JSON path (default: CHECKPOINT/eval_shapes.json)")
    e.set_defaults(func=cmd_eval_shapes)

    e = esub.add_parser("disentangle",
                        help="how much the size condition changes content (docs/method.md §3, Table 2a)",
                        description="Generate each sample from the same noise and label at several original-size "
                                    "conditions and report the mean pairwise LPIPS (all sizes) and LPIPS/HR (the "
                                    "three largest); on shapes also how often colour/shape/position stay the same.")
    _add_sampling_args(e)
    e.add_argument("--sizes", type=_sizes,
                   help="size conditions in pixels (default: the paper's 64,128,256,512,1024 scaled by "
                        "image_size/256)")
    e.add_argument("--num", type=POSITIVE_INT, default=64, help="samples (each generated at every size)")
    e.add_argument("--class", dest="cls", help="class models: one class (default: cycle through all)")
    e.add_argument("--prompt", action="append", help="text models: prompts (default on shapes: every caption)")
    e.add_argument("--lpips-backbone", help="alexnet-owt-7be5be79.pth (default: env/torch hub cache)")
    e.add_argument("--lpips-lin", help="LPIPS v0.1 alex.pth linear weights (default: env/torch hub cache/lpips)")
    e.add_argument("--out", help="JSON path (default: CHECKPOINT/eval_disentangle.json; the figure next to it)")
    e.set_defaults(func=cmd_eval_disentangle)

    e = esub.add_parser("fid", help="FID, sFID, FD-DINOv2, precision/recall (and IS) of generated samples against "
                                    "reference statistics",
                        description="Generate --num-samples images (class-balanced, or cycling through a caption "
                                    "set) in resumable chunks, across ranks under torchrun, featurise them on every "
                                    "rank, save them as an ADM-style .npz and score them against --ref with the FID "
                                    "Inception-v3 (FID, sFID, precision/recall, IS) and DINOv2 ViT-L/14 "
                                    "(FD-DINOv2). The metrics and the full protocol go to OUT/metrics.json, a model "
                                    "card to OUT/MODEL_CARD.md (docs/evaluation.md).")
    _add_sampling_args(e)
    e.add_argument("--num-samples", type=_number(int, 2), default=50_000, help="samples per seed set")
    e.add_argument("--ref", required=True, help="reference .npz: mu/sigma (ADM reference batch or `eval stats`), "
                                                "images arr_0 and/or features for precision/recall")
    e.add_argument("--out", help="output directory (default: CHECKPOINT/eval_fid_<N>); an existing one resumes")
    e.add_argument("--captions", help="text models: caption set, one per line (default on shapes: its captions)")
    e.add_argument("--chunk", type=POSITIVE_INT, default=1000,
                   help="images per resumable chunk (part of the protocol)")
    e.add_argument("--batch-size", type=POSITIVE_INT, default=250, help="sampling batch size")
    e.add_argument("--seed-sets", type=POSITIVE_INT, default=1,
                   help="independent sample sets (set k: seeds seed + k * chunks + c); every metric is reported per "
                        "set with its min, mean and std; each set in OUT/set_k/")
    e.add_argument("--inception", help="FID Inception weights (default: $LDMKIT_INCEPTION_WEIGHTS or the torch "
                                       "hub cache)")
    e.add_argument("--inception-batch", type=POSITIVE_INT, default=200,
                   help="images per Inception / DINOv2 batch")
    e.add_argument("--dinov2", help="DINOv2 ViT-L/14 weights dinov2_vitl14_pretrain.pth for FD-DINOv2 (default: "
                                    "$LDMKIT_DINOV2_WEIGHTS or the torch hub cache; not found: FD-DINOv2 is skipped)")
    e.add_argument("--no-dinov2", action="store_true", help="skip FD-DINOv2 even when its weights are found")
    e.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    e.add_argument("--inception-score", action="store_true", help="also the Inception Score")
    e.add_argument("--clip", help="text models: also CLIPScore with this CLIP model (hub id or local directory, "
                                  "e.g. openai/clip-vit-large-patch14)")
    e.set_defaults(func=cmd_eval_fid)

    e = esub.add_parser("stats", help="reference statistics (FID mu, sigma; sFID mu_s, sigma_s; FD-DINOv2 "
                                      "mu_dinov2, sigma_dinov2; features) of an image folder, an .npz or a recipe")
    e.add_argument("source", help="image folder, .npz with arr_0 images, or a YAML recipe (its dataset)")
    e.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.image_size=32")
    e.add_argument("--out", required=True, help="output .npz (ADM keys mu, sigma; plus features, and arr_0 for a recipe)")
    e.add_argument("--num", type=POSITIVE_INT, default=50_000, help="recipe sources: images to draw from the dataset")
    e.add_argument("--inception", help="FID Inception weights (default: $LDMKIT_INCEPTION_WEIGHTS or the torch hub cache)")
    e.add_argument("--dinov2", help="DINOv2 weights for FD-DINOv2 statistics (default: $LDMKIT_DINOV2_WEIGHTS or the "
                                    "torch hub cache; not found: none are stored)")
    e.add_argument("--no-dinov2", action="store_true", help="no FD-DINOv2 statistics even when the weights are found")
    e.add_argument("--batch-size", type=POSITIVE_INT, default=200)
    e.add_argument("--device", default="auto")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_eval_stats)

    p = sub.add_parser("ablate", help="train and evaluate the variants of an ablation file; table and figure",
                       description="Run configs/ablations/FILE.yaml: train every variant, evaluate each the same "
                                   "way, write results.md/.json/.png. Overrides apply to every variant.")
    p.add_argument("file", help="ablation YAML (see configs/ablations/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. train.steps=200)")
    p.add_argument("--out", help="output directory (default runs/ablation-<name>-<time>; reuse one to continue)")
    p.add_argument("--disentangle-num", type=POSITIVE_INT, default=64, help="samples of the disentanglement score")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1,
                   help="arm x seed runs at a time, each in its own process with train.threads=1 (default 1)")
    p.add_argument("--devices", help="comma-separated devices the runs take round-robin, e.g. cuda:0,cuda:1")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ablate)

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
    p.add_argument("--resolutions", type=POSITIVE_INT, nargs="+", default=[256, 512], help="pixel resolutions")
    p.add_argument("--count", action="store_true",
                   help="build each model on the meta device and count with FlopCounterMode (slow; the reference "
                        "the closed forms are tested against)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert weights to/from diffusers or the official DiT layout")
    p.add_argument("direction", choices=["to-diffusers", "from-diffusers", "from-official-dit"])
    p.add_argument("source", help="to-diffusers: an ldmkit checkpoint, run or weights directory; "
                                  "from-diffusers: a diffusers model directory or hub id; "
                                  "from-official-dit: a facebookresearch/DiT .pt file")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--subfolder", help="from-diffusers: subfolder of a pipeline (e.g. transformer, unet)")
    p.add_argument("--no-ema", action="store_true", help="to-diffusers: the raw weights, not the EMA")
    p.add_argument("--pipeline", action="store_true",
                   help="to-diffusers: a whole pipeline folder (denoiser, VAE, scheduler, text encoder, class names) "
                        "that DiTPipeline / PixArtAlphaPipeline or ldmkit.diffusers_pipeline.LdmkitPipeline load")
    p.add_argument("--num-heads", type=POSITIVE_INT,
                   help="from-official-dit: attention heads (needed for widths other than DiT's S/B/L/XL)")
    p.add_argument("--num-classes", type=POSITIVE_INT,
                   help="from-official-dit: classes of the checkpoint; a class table of N+1 rows then has the null "
                        "row, one of N rows has none (trained without label dropout). Needed unless the table is "
                        "ImageNet-1k's (1001 or 1000 rows) or a JSON beside the file says it")
    p.set_defaults(func=cmd_convert)
    return parser


# Errors of the user's making: one line, exit status 2 (a diverged run: 3). Anything else is a bug and
# shows its traceback. The OS errors are about files the user named (missing, unreadable, not a folder).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # terminal styling some library messages carry
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`train CFG --resume auto run.dir=X`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"ldmkit: error: {_one_line(e)}", file=sys.stderr)
        return 3 if isinstance(e, TrainingDiverged) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
