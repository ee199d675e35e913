"""Tar shards in the img2dataset layout (CC12M, LAION-style, ImageNet as shards) as an endless stream.

A sample is the group of tar members sharing a key: an image (``jpg|jpeg|png|webp``), an optional ``txt``
caption, an optional ``json`` (img2dataset: ``caption``, ``original_width``, ``original_height``, ...) and an
optional ``cls`` (integer class id as text). Shards are opened with ``webdataset.gopen`` (local paths,
http(s), ``pipe:`` commands, ...) and split into members and samples by ``webdataset.tariterators``.

Each epoch permutes the shard list with a seed derived from (seed, epoch), identical on all ranks; reader
slot ``s = rank * num_workers + worker_id`` of ``world_size * num_workers`` reads ``perm[s::slots]``, so
every shard is read by exactly one reader per epoch. A shuffle buffer of *undecoded* samples (bytes, not
tensors: cheap to hold thousands) mixes samples across a reader's shards.

Bad input never raises out of the iterator: it becomes an issue ``(source, kind, detail)``
(``ldmkit.data.decode``) that rides on the ``"issues"`` of the next yielded sample; issues met after a
reader's last sample of an epoch ride on that sample (one sample is held back for this). A tar that ends
early (read error, or no end-of-archive blocks) is ``skipped:shard``; the samples read before the cut are
kept except the last one, whose later members may be missing.

``iter_shard`` reads one shard in file order for ``ldmkit encode``; pass it a list to receive the
skipped/shard issues as they are met (see its docstring).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from ldmkit.config import DataConfig
from ldmkit.data.decode import BadInput, Issue, open_rgb
from ldmkit.data.transforms import CROP_MODES, resize_crop_flip, to_tensor
from ldmkit.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member extensions taken as the image, in this preference
PROBE_SAMPLES = 32  # samples of the first shard read at construction to find one that decodes
MAX_EMPTY_EPOCHS = 10  # a reader whose epochs yield nothing this many times in a row gives up
_PERM_TAG, _BUFFER_TAG = 0x5A4D, 0xB0FF  # separate the random streams derived from the seed
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tail check not possible


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from ';'-separated brace patterns (or a list of them), in order, without repeats."""
    patterns = urls.split(";") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        pattern = pattern.strip()
        if pattern:
            out.extend(braceexpand.braceexpand(pattern))
    unique = list(dict.fromkeys(out))
    if len(unique) < len(out):  # a shard listed twice would be read twice per epoch
        warnings.warn(f"data.path: {len(out) - len(unique)} repeated shard(s) ignored", stacklevel=2)
    return unique


def local_path(url: str) -> str | None:
    """The file a URL names when it is a local path (plain or ``file:``), else None (remote, ``pipe:``, ``-``)."""
    if url == "-":
        return None
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


def _error_text(exn: BaseException) -> str:
    """``Type: message`` without the stream objects webdataset appends to ``args``."""
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}"


class _TrackedStream:
    """A read-only stream wrapper that remembers the first and the last 512 bytes read.

    ``tarfile`` treats a tar cut at a header boundary (or inside a header) as a normal end, so
    completeness is checked afterwards: an uncompressed tar ends with zero blocks.
    """

    def __init__(self, raw: Any, url: str) -> None:
        self.raw, self.url = raw, url
        self.head = b""
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        if data:
            self.tail = (self.tail + data)[-512:]
        return data

    def compressed(self) -> bool:
        return self.head.startswith(_COMPRESSED_MAGIC)

    def trailing_problem(self) -> str | None:
        """Why the tar did not end cleanly (None if it did); reads whatever tarfile left unread."""
        if self.compressed():
            return None
        while True:  # after the end-of-archive blocks only zero padding may follow
            chunk = self.read(1 << 16)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                return "data follows an unreadable tar header (the rest of the shard was not read)"
        if self.tail.count(0) != len(self.tail) or not self.tail:
            return "no end-of-archive blocks: the tar is truncated"
        return None

    def __str__(self) -> str:  # webdataset puts the stream in its error messages
        return self.url


class ShardSource(IterableDataset):
    """Endless samples from tar shards, sharded over ranks and loader workers, bad input reported not raised.

    Each sample: ``image`` (3, S, S) float32 in [-1, 1]; ``class_id`` int (-1: none); ``caption`` str
    (``txt``, else the json ``caption``, else ""); ``control`` (``resize_crop_flip`` metadata, ``orig_size``
    from the json's ``original_height/width`` when present); ``issues`` (what was skipped just before
    it, then its own conversions; an epoch's last sample also what came after it); ``key`` (``"{shard_url}#{member key}"``).

    Args:
        urls: shard URLs: a string of ';'-separated brace patterns, or a list.
        image_size, crop, flip_prob, crop_scale, crop_ratio, min_size: as in ``DataConfig``.
        seed: seeds the shard permutations, shuffle buffers and per-sample augmentation (must be >= 0).
        shuffle_buffer: undecoded samples mixed in each reader (0: file order within each shard).
        need_caption: skip samples without a caption (``skipped:empty_caption``).
        num_classes: when > 0, a ``cls`` outside [0, num_classes) is ``skipped:bad_label``.
        rank, world_size: data-parallel sharding; start_epoch: the first epoch (resume).
        max_epochs: stop after this many epochs (None: endless; finite runs are for tests and tools).
    """

    def __init__(self, urls: str | Sequence[str], image_size: int, crop: str = "center",
                 flip_prob: float = 0.5, seed: int = 0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), min_size: int = 0,
                 shuffle_buffer: int = 2000, need_caption: bool = False, num_classes: int = 0,
                 rank: int = 0, world_size: int = 1, start_epoch: int = 0,
                 max_epochs: int | None = None) -> None:
        super().__init__()
        if crop not in CROP_MODES:
            raise DataError(f"data.crop: unknown crop {crop!r}; expected one of {CROP_MODES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.urls = urls if isinstance(urls, str) else list(urls)
        self.shards = expand_urls(urls)
        if not self.shards:
            raise DataError(f"data.path: no shards in {urls!r}")
        missing = [u for u in self.shards if (p := local_path(u)) is not None and not os.path.isfile(p)]
        if missing:
            listed = ", ".join(missing[:3]) + (f", ..., {missing[-1]}" if len(missing) > 3 else "")
            raise FileNotFoundError(f"data.path: {len(missing)} of {len(self.shards)} shards do not exist: "
                                    f"{listed} (data.path = {urls!r})")
        if len(self.shards) < world_size:
            raise DataError(self._too_few_message(world_size, 1))
        self.image_size, self.crop, self.flip_prob, self.seed = image_size, crop, flip_prob, seed
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.min_size, self.shuffle_buffer = min_size, shuffle_buffer
        self.need_caption, self.num_classes = need_caption, num_classes
        self.rank, self.world_size = rank, world_size
        self.start_epoch, self.max_epochs = start_epoch, max_epochs
        self._probe()

    # ---- description and checks -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What is read and how, as a JSON-able dict (for run records)."""
        return {"kind": "webdataset", "urls": self.urls, "image_size": self.image_size, "crop": self.crop,
                "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio),
                "min_size": self.min_size, "need_caption": self.need_caption, "num_shards": len(self.shards)}

    def _too_few_message(self, world_size: int, num_workers: int) -> str:
        slots = world_size * num_workers
        return (f"data.path has {len(self.shards)} shard(s) but {world_size} rank(s) x {num_workers} loader "
                f"worker(s) = {slots} readers, and each reader needs at least one shard per epoch; use fewer "
                f"data.num_workers or ranks, or write the data into at least {slots} shards")

    def _probe(self) -> None:
        """Fail now, not in a worker hours later, when the first shard is unreadable or holds nothing usable."""
        url, pending = self.shards[0], []
        groups = self._groups(url, pending)
        read = 0
        try:
            for group in groups:
                read += 1
                if self._decode(group, self.start_epoch, pending) is not None:
                    return
                if read >= PROBE_SAMPLES:
                    break
        finally:
            groups.close()
        shard_errors = [d for _, k, d in pending if k == "skipped:shard"]
        if read == 0 and shard_errors:
            raise DataError(f"data.path: the first shard {url} cannot be read: {shard_errors[0]}")
        kinds = ", ".join(f"{k} x{n}" for k, n in Counter(k for _, k, _ in pending).items()) or "no samples"
        raise DataError(f"data.path: the first shard {url} holds no usable sample in its first {read} "
                         f"sample(s) ({kinds})")

    # ---- reading ----------------------------------------------------------------------------------

    def _groups(self, url: str, pending: list[Issue]) -> Iterator[dict[str, Any]]:
        """The raw member groups of one shard in file order; read errors go to ``pending``, never raise.

        After a read error the last group is dropped: its members may have been cut off (a sample
        without its ``cls`` would silently become unlabelled).
        """
        errors: list[str] = []

        def stop(exn: Exception) -> bool:  # tar errors end this shard
            errors.append(_error_text(exn))
            return False

        def skip_member(exn: Exception) -> bool:  # e.g. a duplicate member name: drop that member
            pending.append((url, "skipped:member", _error_text(exn)))
            return True

        try:
            raw = gopen(url, "rb")
        except Exception as exn:  # noqa: BLE001 - any failure to open is this shard's problem
            pending.append((url, "skipped:shard", f"cannot open: {_error_text(exn)}"))
            return
        stream = _TrackedStream(raw, url)
        finished = False
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
            held, count = None, 0
            for group in group_by_keys(files, handler=skip_member):
                if held is not None:
                    count += 1
                    yield held
                held = group
            if not errors:
                try:
                    problem = stream.trailing_problem()
                except Exception as exn:  # noqa: BLE001 - e.g. a pipe whose command failed
                    problem = _error_text(exn)
                if problem:
                    errors.append(problem)
            finished = True
            try:
                raw.close()  # a pipe: reports its command's exit status here
            except Exception as exn:  # noqa: BLE001
                errors.append(_error_text(exn))
            if errors:
                dropped = f"; its last sample {held['__key__']} was dropped" if held is not None else ""
                pending.append((url, "skipped:shard", f"{errors[0]} after {count} sample(s){dropped}"))
            elif held is not None:
                yield held
        finally:
            if not finished:  # stopped early by the consumer (or failed): close quietly
                try:
                    raw.close()
                except Exception:  # noqa: BLE001, S110 - nothing more was wanted from it
                    pass

    def _decode(self, group: dict[str, Any], epoch: int, pending: list[Issue]) -> dict[str, Any] | None:
        """One sample from a member group, or None with the reason appended to ``pending``."""
        url = group["__url__"]
        key = f"{url}#{group['__key__']}"
        ext = next((e for e in IMAGE_KEYS if e in group), None)
        if ext is None:
            members = sorted(k for k in group if not k.startswith("__"))
            pending.append((key, "skipped:no_image", f"members: {', '.join(members) or 'none'}"))
            return None

        meta: dict[str, Any] = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"])
                if not isinstance(meta, dict):
                    raise TypeError(f"a JSON {type(meta).__name__}, not an object")
            except (ValueError, TypeError) as exn:  # UnicodeDecodeError and JSONDecodeError included
                pending.append((key, "skipped:bad_json", _error_text(exn)))
                return None

        caption = group["txt"].decode("utf-8", errors="replace").strip() if "txt" in group else ""
        if not caption and isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
        if self.need_caption and not caption:
            pending.append((key, "skipped:empty_caption", "no txt member and no json caption"
                            if "txt" not in group and "caption" not in meta else "the caption is empty"))
            return None

        class_id = -1
        if "cls" in group:
            text = group["cls"].decode("utf-8", errors="replace").strip()
            try:
                class_id = int(text)
            except ValueError:
                pending.append((key, "skipped:bad_label", f"cls {text[:40]!r} is not an integer"))
                return None
            if class_id < 0 or (self.num_classes > 0 and class_id >= self.num_classes):
                pending.append((key, "skipped:bad_label",
                                f"cls {class_id} is outside [0, {self.num_classes or 'inf'})"))
                return None

        orig: tuple[float, float] | None = None
        oh, ow = meta.get("original_height"), meta.get("original_width")
        if oh is not None and ow is not None:
            try:
                orig = (float(oh), float(ow))
                if not (orig[0] >= 1 and orig[1] >= 1):
                    raise ValueError(f"{ow}x{oh}")
            except (TypeError, ValueError):
                pending.append((key, "skipped:bad_json", f"original size {ow!r}x{oh!r} is not positive"))
                return None
            if min(orig) < self.min_size:  # img2dataset may have upscaled a small source
                detail = f"original {orig[1]:.0f}x{orig[0]:.0f} is below data.min_size={self.min_size}"
                pending.append((key, "skipped:too_small", detail))
                return None

        issues: list[Issue] = []
        try:
            img = open_rgb(group[ext], issues, name=key, min_size=self.min_size)
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode())])
            img, control = resize_crop_flip(img, self.image_size, self.crop, self.flip_prob, rng,
                                            scale=self.crop_scale, ratio=self.crop_ratio)
            image = to_tensor(img)
        except BadInput as exn:
            pending.append((key, exn.kind, exn.detail))
            return None
        except Exception as exn:  # noqa: BLE001 - a decoder failing in an unexpected way is still just a bad file
            pending.append((key, "skipped:corrupt", _error_text(exn)))
            return None
        if orig is not None:
            control["orig_size"] = orig
        return {"image": image, "class_id": class_id, "caption": caption, "control": control,
                "issues": issues, "key": key}

    def _decoded(self, groups: Iterable[dict[str, Any]], epoch: int,
                 pending: list[Issue]) -> Iterator[dict[str, Any]]:
        for group in groups:
            sample = self._decode(group, epoch, pending)
            if sample is not None:  # it carries what was skipped (or went wrong) just before it
                sample["issues"] = pending[:] + sample["issues"]
                pending.clear()
                yield sample

    def iter_shard(self, url: str, epoch: int = 0, issues: list[Issue] | None = None) -> Iterator[dict[str, Any]]:
        """The samples of one shard in file order (no shuffle), with the sample contract above.

        With ``issues`` (a list the caller owns), what is skipped or goes wrong (bad samples, a truncated
        tar) is appended to it as it is met, so when a sample is yielded the list holds what was skipped
        just before it, and at the end what came after the last one; each sample's own ``"issues"`` then
        holds only its conversions. Without it, skips ride on the next sample and those after the last
        sample on that last one; a shard yielding no sample at all then warns.
        """
        caller_owned = issues is not None
        pending: list[Issue] = issues if caller_owned else []
        groups = self._groups(url, pending)
        try:
            if caller_owned:
                for group in groups:
                    sample = self._decode(group, epoch, pending)
                    if sample is not None:
                        yield sample
            else:
                yield from _keep_trailing(self._decoded(groups, epoch, pending), pending)
        finally:
            groups.close()
        if pending and not caller_owned:
            warnings.warn(f"{url}: no usable sample; {len(pending)} issue(s) not reported: {pending[:3]}",
                          stacklevel=2)

    def _reader(self) -> tuple[int, int]:
        """(slot, slots) of this process: rank-major over DataLoader workers."""
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slots = self.world_size * num_workers
        if len(self.shards) < slots:
            raise DataError(self._too_few_message(self.world_size, num_workers))
        return self.rank * num_workers + worker, slots

    def epoch_shards(self, epoch: int, slot: int = 0, slots: int = 1) -> list[str]:
        """The shards reader ``slot`` of ``slots`` reads in ``epoch``, in reading order."""
        perm = np.random.default_rng([self.seed, epoch, _PERM_TAG]).permutation(len(self.shards))
        return [self.shards[i] for i in perm[slot::slots]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._reader()
        pending: list[Issue] = []  # issues waiting for a sample to ride on; carried across epochs
        epoch, empty = self.start_epoch, 0
        while self.max_epochs is None or epoch < self.start_epoch + self.max_epochs:
            groups = (g for url in self.epoch_shards(epoch, slot, slots) for g in self._groups(url, pending))
            rng = np.random.default_rng([self.seed, epoch, slot, _BUFFER_TAG])
            samples = self._decoded(_shuffled(groups, self.shuffle_buffer, rng), epoch, pending)
            count = 0
            for sample in _keep_trailing(samples, pending):
                count += 1
                yield sample
            empty = 0 if count else empty + 1
            if empty >= MAX_EMPTY_EPOCHS:  # nothing readable any more: fail rather than spin forever
                kinds = Counter(k for _, k, _ in pending)
                raise RuntimeError(f"data.path: reader {slot} of {slots} got no usable sample in {empty} epochs "
                                   f"in a row ({dict(kinds)}; e.g. {pending[-1] if pending else None})")
            epoch += 1


def _shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Items mixed through a buffer of ``size`` (0: unchanged order); every item comes out exactly once."""
    if size <= 0:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _keep_trailing(samples: Iterable[dict[str, Any]], pending: list[Issue]) -> Iterator[dict[str, Any]]:
    """The samples, the last one also carrying the issues still pending when the stream ends.

    One sample is held back so that issues met after the last one (trailing bad samples, a truncated
    shard) ride on it instead of being lost when the stream ends.
    """
    held = None
    for sample in samples:
        if held is not None:
            yield held
        held = sample
    if held is not None:
        held["issues"] = held["issues"] + pending
        pending.clear()
        yield held


def read_class_count(path: str) -> int:
    """Entries in a class map: a JSON list/object, or one entry a line (blank and ``#`` lines ignored)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip()[:1] in ("{", "["):
        return len(json.loads(text))
    return sum(1 for line in io.StringIO(text) if line.strip() and not line.lstrip().startswith("#"))


def build_shard_source(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                       need_caption: bool = False, flip_prob: float | None = None,
                       start_epoch: int = 0) -> ShardSource:
    """The ``ShardSource`` a ``webdataset`` data config describes."""
    if not cfg.path:
        raise DataError("data.path: a webdataset source needs shard pattern(s), e.g. /data/cc12m/{00000..01242}.tar")
    num_classes = read_class_count(cfg.class_map) if cfg.class_map else 0
    return ShardSource(cfg.path, image_size=cfg.image_size, crop=cfg.crop,
                       flip_prob=cfg.flip_prob if flip_prob is None else flip_prob, seed=seed,
                       crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio), min_size=cfg.min_size,
                       shuffle_buffer=cfg.shuffle_buffer, need_caption=need_caption, num_classes=num_classes,
                       rank=rank, world_size=world_size, start_epoch=start_epoch)
