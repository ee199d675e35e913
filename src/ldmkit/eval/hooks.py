"""Evaluations a run performs while it trains, built from functions the command line uses too.

- ``sample_images``: decode guided samples of a condition to uint8 images (``ldmkit sample``, grids);
- ``shapes_accuracy``: the analytic shapes evaluation of a class or text model (``ldmkit eval shapes``);
- ``RunEvaluator``: the EMA model's sample grids, shapes accuracy and FID at a run's evaluation steps.
  Rank 0 samples; the other ranks wait at a barrier (and take part in gathering sharded EMA weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ldmkit.autoencoders import to_uint8
from ldmkit.conditioning import Conditioner, Conditioning
from ldmkit.config import Config
from ldmkit.sampling import SampleSettings, default_control, generate, make_grid


def sample_images(model: nn.Module, cond: Conditioning, uncond: Optional[Conditioning],
                  latent_shape: tuple[int, int, int], decode: Callable, settings: SampleSettings, *, seed: int,
                  device: torch.device, progress: bool = False) -> np.ndarray:
    """Guided samples of ``cond``, decoded: (N, H, W, 3) uint8."""
    x = generate(model, cond, latent_shape, settings, uncond=uncond, seed=seed, device=device, progress=progress)
    return to_uint8(decode(x.to(device))).numpy()


def shapes_accuracy(model: nn.Module, dataset: Any, text: Any, *, decode: Callable, device: torch.device,
                    settings: SampleSettings, control: dict[str, Any], seed: int, per_class: int,
                    per_caption: int, progress: bool = False) -> dict[str, Any]:
    """Colour/shape (and position) accuracy of a model trained on ``shapes``: per class for class models,
    per caption for text models (``text`` is their ``TextConditioner``)."""
    from ldmkit.eval.shapes import evaluate_captions, evaluate_generation

    common = dict(control=control, seed=seed, device=device, decode=decode, progress=progress, settings=settings)
    if text is None:
        return evaluate_generation(model, dataset, per_class=per_class, **common)
    return evaluate_captions(model, dataset, text, per_caption=per_caption, **common)


class RunEvaluator:
    """The evaluations of a training run, on its EMA weights.

    Args:
        cfg: the run's config (``sample.*`` and ``eval.*`` say what and how).
        device: where to sample.
        barrier: waits for every rank (after rank 0's sampling).
        ema_model: returns a plain model holding the EMA weights on rank 0 (None elsewhere); collective.
        conditioner: the run's ``Conditioner`` (its text conditioner for text models).
        autoencoder: decodes latents to images.
        dataset: the training source (its classes; a latent cache of ``shapes`` is re-opened as ``shapes``).
        latent_shape: (C, H, W) of the model's input.
        run_dir: where grids go (``samples/``).
        seen_captions: captions met in training (text grids on real data).
    """

    def __init__(self, cfg: Config, device: torch.device, barrier: Callable[[], None],
                 ema_model: Callable[[], Optional[nn.Module]], conditioner: Conditioner, autoencoder: Any,
                 dataset: Any, latent_shape: tuple[int, int, int], run_dir: Path,
                 seen_captions: Callable[[], Optional[list[str]]]) -> None:
        self.cfg, self.device, self.barrier = cfg, device, barrier
        self.ema_model, self.conditioner, self.autoencoder = ema_model, conditioner, autoencoder
        self.dataset, self.latent_shape, self.run_dir = dataset, latent_shape, run_dir
        self.seen_captions = seen_captions
        self._shapes = None
        self._fid = None  # (InceptionFeatures, reference stats, make_cond), built at the first FID evaluation

    @property
    def text(self):
        return self.conditioner.text

    def settings(self, model: nn.Module) -> SampleSettings:
        return SampleSettings.from_config(self.cfg, model)

    def _control(self) -> dict[str, Any]:
        s = self.cfg.sample
        return dict(orig_size=s.orig_size, crop=s.crop, flip=s.flip)

    def shapes_dataset(self):
        """The procedural ``shapes`` source (for its evaluations), also when training reads a cache of it."""
        from ldmkit.data.latents import LatentCacheDataset

        if not isinstance(self.dataset, LatentCacheDataset):
            return self.dataset
        if self._shapes is None:
            from ldmkit.data import build_dataset

            self._shapes = build_dataset(self.cfg.data, seed=self.cfg.seed)
        return self._shapes

    def grid_prompts(self) -> list[str]:
        """Text models: the prompts of the sample grid (sample.prompts, else up to 8 distinct captions)."""
        if self.cfg.sample.prompts:
            return list(self.cfg.sample.prompts)
        if self.cfg.data.name == "shapes":  # every caption of the procedural set is known
            source = self.shapes_dataset()
            candidates = [source[i]["caption"] for i in range(min(len(source), 200))]
        else:
            candidates = self.seen_captions() or []
        captions: list[str] = []
        for caption in candidates:
            if caption and caption not in captions:
                captions.append(caption)
            if len(captions) == 8:
                break
        return captions

    def write_grid(self, name: str) -> Optional[Path]:
        """A grid of EMA samples: one column per class (or prompt), ``sample.grid_rows`` noises each."""
        model = self.ema_model()
        path = None
        if model is not None:
            s = self.cfg.sample
            if self.text is None:
                n_cls = self.dataset.num_classes
                ncol = min(n_cls, 18) if s.grid_classes <= 0 else min(s.grid_classes, n_cls)
                control = default_control(ncol * s.grid_rows, self.cfg.data.image_size, **self._control())
                cond, uncond = self.conditioner.for_sampling(control, class_ids=torch.arange(ncol).repeat(s.grid_rows))
            else:
                prompts = self.grid_prompts()
                ncol = len(prompts)
                control = default_control(ncol * s.grid_rows, self.cfg.data.image_size, **self._control())
                cond, uncond = self.conditioner.for_sampling(control, prompts=prompts * s.grid_rows)
            images = sample_images(model, cond, uncond, self.latent_shape, self.autoencoder.decode,
                                   self.settings(model), seed=self.cfg.seed, device=self.device)
            path = self.run_dir / "samples" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            make_grid(images, ncol=ncol).save(path)
        self.barrier()
        return path

    def shapes(self) -> Optional[dict[str, Any]]:
        """``eval.shapes_per_class`` (or ``_per_caption``) EMA samples scored by the shapes evaluator."""
        model = self.ema_model()
        result = None
        if model is not None:
            e = self.cfg.eval
            result = shapes_accuracy(model, self.shapes_dataset(), self.text, decode=self.autoencoder.decode,
                                     device=self.device, settings=self.settings(model), control=self._control(),
                                     seed=self.cfg.seed + 7, per_class=e.shapes_per_class,
                                     per_caption=e.shapes_per_caption)
        self.barrier()
        return result

    def fid(self) -> Optional[float]:
        """FID of ``eval.fid_num_samples`` EMA samples against ``eval.fid_ref``."""
        model = self.ema_model()
        fid = None
        if model is not None:
            from ldmkit.eval.fid import load_reference
            from ldmkit.eval.inception import InceptionFeatures
            from ldmkit.eval.protocol import condition_maker, fid_of_model

            e = self.cfg.eval
            if self._fid is None:
                inception = InceptionFeatures(weights=e.inception_weights, device=self.device, progress=False)
                captions = None
                if self.text is not None:
                    if e.fid_captions:
                        captions = [c.strip() for c in Path(e.fid_captions).read_text().splitlines() if c.strip()]
                    else:
                        from ldmkit.eval.shapes import all_captions

                        captions = [c for c, *_ in all_captions(self.shapes_dataset())]
                make_cond, _ = condition_maker(model, self.cfg.data.image_size, e.fid_num_samples, text=self.text,
                                               captions=captions, control=self._control())
                self._fid = (inception, load_reference(e.fid_ref, features_fn=inception.extract), make_cond)
            inception, reference, make_cond = self._fid
            fid = fid_of_model(model, reference, inception, e.fid_num_samples, make_cond=make_cond,
                               latent_shape=self.latent_shape, decode=self.autoencoder.decode,
                               settings=self.settings(model), seed=self.cfg.seed + 13, device=self.device)
        self.barrier()
        return fid

