"""Decoding source images robustly: every image becomes RGB, every unusable one a counted ``BadInput``.

At the scale of ImageNet-22k or CC12M some files are always corrupt, truncated, CMYK, palette or
16-bit; a run must convert what it can and skip the rest without stopping (docs/data.md). Datasets call
``open_rgb`` and record what happened as *issues*: ``(source, kind, detail)`` tuples that travel with
the samples to the trainer (or the encoder), which counts them in a ``DataReport`` and writes
``data_report.json``.

Kinds: ``skipped:*`` (the sample was not used) and ``converted:*`` (used after a conversion).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Union

from PIL import Image, ImageOps

from ldmkit.files import atomic_write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
Issue = tuple[str, str, str]  # (source: file or shard/key, kind, detail)
MAX_LISTED = 1000  # files listed per kind in a report (all are counted)

# Decompression bombs are refused rather than decoded into gigabytes (Pillow's own limit is a warning).
Image.MAX_IMAGE_PIXELS = 16_384 * 16_384


class BadInput(Exception):
    """A source sample that cannot be used; ``kind`` is the report category (e.g. ``skipped:corrupt``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def open_rgb(source: Union[str, os.PathLike, bytes], issues: list[Issue] | None = None,
             name: str | None = None, min_size: int = 0) -> Image.Image:
    """A fully decoded RGB image from a path or encoded bytes.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted (alpha is composited on white, as a
    viewer shows it) and the conversion is appended to ``issues``. Raises ``BadInput`` for corrupt or
    truncated data and for images whose short side is below ``min_size``.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Our own file handle, closed whatever happens (Pillow keeps failed or multi-frame files open).
            with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as fh:
                img = Image.open(fh)
                img.load()  # decode now: a truncated file fails here, not in a worker later
                img = ImageOps.exif_transpose(img)  # as viewers show it (phone photos are stored rotated)
    except FileNotFoundError as e:
        raise BadInput("skipped:missing", str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("skipped:too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on hostile data
        kind = "skipped:truncated" if "truncat" in str(e).lower() else "skipped:corrupt"
        raise BadInput(kind, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadInput("skipped:corrupt", f"empty image {w}x{h}")
    if min(w, h) < min_size:
        raise BadInput("skipped:too_small", f"{w}x{h} is below data.min_size={min_size}")
    if img.mode != "RGB":
        mode = img.mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        elif mode.startswith("I;16") or mode == "I":  # 16/32-bit grey: scale to 8 bits, not clip
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
        else:
            img = img.convert("RGB")
        if issues is not None:
            issues.append((name, f"converted:{mode}", f"{mode} -> RGB"))
    return img


class DataReport:
    """Counts (and lists, up to ``MAX_LISTED`` per kind) the issues seen while reading a dataset."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, dict[str, str]] = {}
        self.seen: set[tuple[str, str]] = set()

    def add(self, issues: Iterable[Issue]) -> None:
        """Record issues; a (source, kind) pair seen before (e.g. in an earlier epoch) is not counted again."""
        for source, kind, detail in issues:
            if (source, kind) in self.seen:
                continue
            self.seen.add((source, kind))
            self.counts[kind] += 1
            listed = self.examples.setdefault(kind, {})
            if len(listed) < MAX_LISTED:
                listed[source] = detail

    @property
    def skipped(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("skipped"))

    @property
    def converted(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("converted"))

    def summary(self) -> str:
        if not self.counts:
            return "data: no bad or converted inputs"
        parts = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"data: {self.skipped} skipped, {self.converted} converted ({parts})"

    def to_dict(self) -> dict:
        return {"skipped": self.skipped, "converted": self.converted, "counts": dict(self.counts),
                "files": self.examples}

    def save(self, path: Union[str, Path]) -> None:
        """Write the report as JSON atomically (tmp + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
