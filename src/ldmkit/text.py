"""Text tokens for conditioning: padding modes (docs/method.md §4).

A frozen encoder gives ``n_valid`` real token embeddings per prompt (specials included, as the encoder
emits them); models take a fixed length L. ``pad_tokens`` fills positions ``n_valid..L-1``:

- ``zero``: zeros, with a mask that marks them (``use_mask=False`` leaves every position attendable,
  the "dead tokens" the paper criticises);
- ``replicate``: the real tokens repeated cyclically, ``out[i] = emb[i % n_valid]``, all unmasked;
- ``noisy_replicate``: the same plus ``σ · rms(real tokens) · N(0, I)`` on the replicas only, where the
  RMS is over all real tokens and channels of that prompt; by default only in training.

The null prompt for guidance is the encoding of the empty string, padded the same way.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

PaddingMode = Literal["zero", "replicate", "noisy_replicate"]
PADDING_MODES = ("zero", "replicate", "noisy_replicate")


def pad_tokens(emb: Tensor, n_valid: Tensor, length: int, mode: PaddingMode = "noisy_replicate",
               sigma: float = 0.1, noise: bool = True, use_mask: bool = True,
               generator: Optional[torch.Generator] = None,
               eps: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Pad (or truncate) encoder outputs to ``length`` tokens.

    Args:
        emb: (B, L_in, D) token embeddings; row b holds ``n_valid[b]`` real tokens first (the rest is
            ignored, whatever it holds).
        n_valid: (B,) int, 1 <= n_valid[b] <= L_in (an encoder always emits at least one token).
        length: L, the model's text length; real tokens beyond L are truncated.
        mode: ``zero | replicate | noisy_replicate``.
        sigma: noise scale of ``noisy_replicate``, relative to the RMS of the prompt's real tokens.
        noise: add the noise (callers pass ``training or noise_at_inference``).
        use_mask: ``zero`` mode only: return a mask of the real tokens (else None).
        generator: for the noise (the trainer passes its per-step generator: reproducible).
        eps: (B, L, D) standard normal noise to use instead of drawing it (the trainer draws it for the
            whole global batch, so that each rank's rows do not depend on how the batch is split).

    Returns:
        (B, L, D) tokens and a (B, L) bool mask (True = real token) or None when every position may be
        attended to.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"text padding mode {mode!r}: expected one of {PADDING_MODES}")
    if emb.ndim != 3:
        raise ValueError(f"pad_tokens: expected emb of shape (B, L, D), got {tuple(emb.shape)}")
    B, L_in, D = emb.shape
    n_valid = torch.as_tensor(n_valid, device=emb.device).long()
    if n_valid.shape != (B,) or bool((n_valid < 1).any()) or bool((n_valid > L_in).any()):
        raise ValueError(f"pad_tokens: n_valid must be (B,) = ({B},) with values in [1, {L_in}], got {n_valid.tolist()}")
    if length < 1:
        raise ValueError(f"pad_tokens: length must be >= 1, got {length}")
    n = n_valid.clamp(max=length)  # (B,) real tokens kept
    pos = torch.arange(length, device=emb.device)  # (L,)
    real = pos[None, :] < n[:, None]  # (B, L)
    if mode == "zero":
        src = torch.minimum(pos[None, :], n[:, None] - 1)  # any real index; zeroed below
    else:
        src = pos[None, :] % n[:, None]  # (B, L): cyclic replication
    out = torch.gather(emb, 1, src[..., None].expand(B, length, D))  # (B, L, D)
    if mode == "zero":
        out = out * real[..., None]
        return out, (real if use_mask else None)
    if mode == "noisy_replicate" and noise and sigma > 0:
        keep = real[..., None].to(emb.dtype)  # (B, L, 1)
        sq = (emb.float() ** 2 * (torch.arange(L_in, device=emb.device)[None, :] < n[:, None])[..., None]).sum((1, 2))
        rms = (sq / (n * D)).sqrt().to(emb.dtype)  # (B,)
        if eps is None:
            eps = torch.randn(out.shape, generator=generator,
                              device="cpu" if generator is None else generator.device, dtype=torch.float32)
        elif eps.shape != out.shape:
            raise ValueError(f"pad_tokens: eps has shape {tuple(eps.shape)}, expected {tuple(out.shape)}")
        eps = eps.to(device=emb.device, dtype=emb.dtype)
        out = out + (1 - keep) * sigma * rms[:, None, None] * eps
    return out, None


class TextConditioner:
    """Prompts -> the text fields of a ``Conditioning``: a frozen encoder, then padding to ``length``.

    Args:
        encoder: a ``ldmkit.text_encoder.TextEncoder`` (or anything with ``encode``, ``width`` and
            ``pooled_width``).
        length: L, the number of text tokens the model takes.
        mode, sigma, use_mask: the padding (``pad_tokens``).
        noise_at_inference: add the ``noisy_replicate`` noise outside training too (off by default).
        pooled: also return the pooled vector (for models built with ``pooled_dim > 0``).
    """

    def __init__(self, encoder, length: int = 32, mode: PaddingMode = "noisy_replicate", sigma: float = 0.1,
                 use_mask: bool = True, noise_at_inference: bool = False, pooled: bool = False) -> None:
        if mode not in PADDING_MODES:
            raise ValueError(f"text padding mode {mode!r}: expected one of {PADDING_MODES}")
        self.encoder, self.length, self.mode, self.sigma = encoder, int(length), mode, float(sigma)
        self.use_mask, self.noise_at_inference, self.pooled = use_mask, noise_at_inference, pooled

    @property
    def width(self) -> int:
        return int(self.encoder.width)

    @property
    def pooled_width(self) -> int:
        return int(self.encoder.pooled_width) if self.pooled else 0

    def needs_noise(self, training: bool) -> bool:
        return self.mode == "noisy_replicate" and self.sigma > 0 and (training or self.noise_at_inference)

    def __call__(self, prompts: list[str], training: bool = False, device: torch.device | str = "cpu",
                 generator: Optional[torch.Generator] = None,
                 eps: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
        """``{"text": (B, L, D), "text_mask": (B, L) or None, "text_pooled": (B, D_p) or None}`` on ``device``.

        The null prompt of guidance is ``""``, encoded and padded like every other prompt.
        """
        enc = self.encoder.encode(prompts)
        return self._pad(enc.tokens, enc.n_valid, enc.pooled, training, device, generator, eps)

    def from_encoded(self, tokens: Tensor, n_valid: Tensor, pooled: Optional[Tensor],
                     dropped: Optional[Tensor] = None, training: bool = False,
                     device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None,
                     eps: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
        """Like ``__call__`` for encoder outputs read from a latent cache: (B, L_c, D) tokens with
        ``n_valid`` real ones and (B, D_p) pooled vectors; rows where ``dropped`` is True get the null
        prompt's encoding instead (classifier-free guidance dropout)."""
        if dropped is not None and bool(dropped.any()):
            null = self.encoder.encode([""])
            keep = ~dropped.to(tokens.device)
            L_c, n0 = tokens.shape[1], int(null.n_valid[0])
            null_tokens = torch.zeros((1, L_c, tokens.shape[2]), dtype=tokens.dtype, device=tokens.device)
            null_tokens[:, : min(n0, L_c)] = null.tokens[:, : min(n0, L_c)].to(tokens)
            tokens = torch.where(keep[:, None, None], tokens, null_tokens)
            n_valid = torch.where(keep, n_valid.to(tokens.device), min(n0, L_c))
            if pooled is not None:
                pooled = torch.where(keep[:, None], pooled, null.pooled.to(pooled))
        return self._pad(tokens, n_valid, pooled, training, device, generator, eps)

    def _pad(self, tokens: Tensor, n_valid: Tensor, pooled: Optional[Tensor], training: bool,
             device: torch.device | str, generator: Optional[torch.Generator],
             eps: Optional[Tensor]) -> dict[str, Optional[Tensor]]:
        tokens, mask = pad_tokens(tokens, n_valid, self.length, self.mode, self.sigma,
                                  noise=self.needs_noise(training), use_mask=self.use_mask,
                                  generator=generator, eps=eps)
        return {"text": tokens.to(device), "text_mask": None if mask is None else mask.to(device),
                "text_pooled": pooled.to(device) if self.pooled and pooled is not None else None}


def build_text_conditioner(tc, device: torch.device | str = "cpu") -> TextConditioner:
    """The frozen encoder and the padding a run's ``cond.text`` section (``config.TextConfig``) describes;
    the encoder's cache is pre-filled from ``tc.cache_file`` when that file exists."""
    from ldmkit.text_encoder import load_text_encoder

    encoder = load_text_encoder(tc.encoder, max_length=tc.length, device=device, cache_file=tc.cache_file)
    return TextConditioner(encoder, tc.length, tc.padding, tc.noise_sigma, use_mask=tc.mask_zero_padding,
                           noise_at_inference=tc.noise_at_inference, pooled=tc.pooled)
