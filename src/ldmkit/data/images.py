"""Map-style datasets of image files: ImageNet-style class folders and a folder with a captions file.

Both follow the ``EpochDataset`` protocol (``__len__``, ``get(index, epoch)``) of ``ldmkit.data.stream``
and return the same sample dict:

- ``image``: (3, S, S) float32 in [-1, 1];
- ``class_id``: int, -1 when the dataset has no classes; ``caption``: str, "" when none;
- ``control``: the metadata of ``resize_crop_flip`` (orig_size, crop, flip, aspect);
- ``issues``: the ``Issue`` tuples met while producing the sample (conversions, bad files skipped);
- ``key``: the source's path relative to the dataset root (its stable id).

The randomness of sample ``index`` in ``epoch`` comes from ``default_rng([seed, epoch, index, 1])`` only,
so any worker or process produces the same sample. A file that cannot be used never stops a run: ``get``
reports it and substitutes the next index (deterministically). Problems that would make the whole run
useless (a wrong path, a malformed class map or captions file, no decodable image) are raised at
construction, naming the config key and the path.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from ldmkit.config import DataConfig
from ldmkit.data.decode import IMAGE_EXTENSIONS, BadInput, Issue, open_rgb
from ldmkit.data.transforms import CROP_MODES, resize_crop_flip, to_tensor
from ldmkit.errors import DataError

PathLike = str | os.PathLike

MAX_TRIES = 64  # files tried by get() before it gives up (a whole run of unusable files is a real problem)
PROBE_FILES = 32  # files decoded at construction to check that the dataset yields anything at all
FILE_COLUMNS = ("file", "image", "path", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt")


class PathList(Sequence[str]):
    """An immutable list of strings kept in one UTF-8 buffer plus offsets.

    Millions of Python strings would be touched (reference counts) and so copied into every DataLoader
    worker; two numpy arrays are shared by the forked workers as they are.
    """

    def __init__(self, items: Iterable[str]) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)),
                  out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"PathList index {index} out of range [0, {n})")
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._buffer[a:b].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PathList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"PathList([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


# ---------------------------------------------------------------------------------------------- files


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _check_path(path: PathLike, key: str, directory: bool) -> str:
    """``path`` as a string, or an error naming ``key`` when it is missing or of the wrong kind."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{key}: '{path}' does not exist")
    if directory != os.path.isdir(path):
        raise DataError(f"{key}: '{path}' is not a {'directory' if directory else 'file'}")
    return path


def _check_root(root: PathLike) -> str:
    return _check_path(root, "data.path", directory=True)


def _check_file(path: PathLike, key: str) -> str:
    return _check_path(path, key, directory=False)


def _subfolders(root: str) -> list[str]:
    """Sorted names of the non-hidden directories in ``root`` (symlinks to directories included)."""
    try:
        with os.scandir(root) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"data.path: cannot list '{root}' ({e.strerror or e})") from None


def _image_files(folder: str) -> list[str]:
    """Sorted names of the image files directly in ``folder`` (extension case-insensitive, no hidden)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if _is_image_name(e.name) and e.is_file())
    except OSError as e:  # e.g. a class folder without read permission: not a silently empty class
        raise DataError(f"data.path: cannot read class folder '{folder}' ({e.strerror or e})") from None


def _rel_key(path: str, root: str) -> str:
    """``path`` relative to ``root`` with '/' separators, or the absolute path when outside the root."""
    if os.path.isabs(path):
        rel = os.path.relpath(path, root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            return os.path.normpath(path).replace(os.sep, "/")
        path = rel
    return os.path.normpath(path).replace(os.sep, "/")


class _ExistsCache:
    """File-existence checks by listing each directory once (millions of rows, few directories)."""

    def __init__(self) -> None:
        self._listings: dict[str, set[str]] = {}

    def __call__(self, path: str) -> bool:
        folder, name = os.path.split(path)
        names = self._listings.get(folder)
        if names is None:
            try:
                with os.scandir(folder or ".") as entries:
                    names = {e.name for e in entries if e.is_file()}
            except OSError:
                names = set()
            self._listings[folder] = names
        # A miss is re-checked directly (e.g. a case-insensitive file system).
        return name in names or os.path.isfile(path)


# ---------------------------------------------------------------------------------------------- parsing


def read_class_map(path: PathLike) -> list[str]:
    """Synsets in class-id order from a ``class_map`` file.

    Formats: ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``: the first token of each line)
    or a plain list (one synset per line), ``#`` comments and blank lines ignored, line order = id; or a
    ``.json`` object ``{synset: id}`` whose ids are exactly 0..N-1.
    """
    path = _check_file(path, "data.class_map")

    def malformed(why: str) -> ValueError:
        return ValueError(f"data.class_map: '{path}' is malformed: {why}")

    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise malformed(f"not UTF-8 text ({e})") from None
    if path.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise malformed(f"not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not obj:
            raise malformed("expected a non-empty JSON object {synset: class index}")
        bad = [k for k, v in obj.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise malformed(f"class indices must be integers (see {bad[:3]})")
        if sorted(obj.values()) != list(range(len(obj))):
            raise malformed(f"class indices must be exactly 0..{len(obj) - 1}, each once")
        names = [""] * len(obj)
        for synset, index in obj.items():
            names[index] = synset
        return names

    names = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line.split()[0])
    if not names:
        raise malformed("no class listed (expected one synset per line, e.g. 'n01440764 tench, Tinca tinca')")
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise malformed(f"class(es) listed twice: {dups[:5]}")
    return names


def read_captions(path: PathLike) -> list[tuple[int, str | None, str | None]]:
    """Rows ``(line, file, caption)`` of a captions CSV (or TSV) with a header, or of a JSONL file.

    The file column is the first of ``file|image|path|filename`` present, the caption column the first of
    ``caption|text|prompt`` (names case-insensitive); a value that is absent is None. JSONL is chosen by
    the extension (``.jsonl``, ``.ndjson``) or by a first character ``{``.
    """
    path = _check_file(path, "data.captions")

    def malformed(why: str) -> ValueError:
        return ValueError(f"data.captions: '{path}' is malformed: {why}")

    def pick(columns: Iterable[str], wanted: tuple[str, ...]) -> str | None:
        present = set(columns)
        return next((c for c in wanted if c in present), None)

    def missing_columns(found: Sequence[str], what: str, wanted: tuple[str, ...]) -> ValueError:
        return ValueError(f"data.captions: '{path}' has no {what} column (one of {', '.join(wanted)}); "
                          f"columns found: {', '.join(found) or 'none'}")

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise malformed(f"not UTF-8 text ({e})") from None
    lower = path.lower()
    is_jsonl = lower.endswith((".jsonl", ".ndjson")) or (
        not lower.endswith((".csv", ".tsv")) and text.lstrip().startswith("{"))

    rows: list[tuple[int, str | None, str | None]] = []
    if is_jsonl:
        first_keys: list[str] = []
        any_file = any_caption = False
        # split on "\n" only: JSON strings may hold U+2028 and other characters splitlines() breaks at
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise malformed(f"line {n} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise malformed(f"line {n} is not a JSON object")
            obj = {str(k).lower(): v for k, v in obj.items()}
            first_keys = first_keys or list(obj)
            fcol, ccol = pick(obj, FILE_COLUMNS), pick(obj, CAPTION_COLUMNS)
            any_file, any_caption = any_file or fcol is not None, any_caption or ccol is not None
            file, caption = obj.get(fcol) if fcol else None, obj.get(ccol) if ccol else None
            for name, value in (("file", file), ("caption", caption)):
                if value is not None and not isinstance(value, str):
                    raise malformed(f"line {n}: the {name} must be a string, got {type(value).__name__}")
            rows.append((n, file, caption))
        if not rows:
            raise malformed("no rows")
        if not any_file:
            raise missing_columns(first_keys, "file", FILE_COLUMNS)
        if not any_caption:
            raise missing_columns(first_keys, "caption", CAPTION_COLUMNS)
        return rows

    if text.lstrip().startswith("["):
        raise malformed("a JSON array; expected JSONL (one JSON object per line) or CSV with a header")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if lower.endswith(".tsv") else ",")
    try:
        header = next(reader, None)
        if header is None:
            raise malformed("empty file (expected a header row, e.g. 'file,caption')")
        columns = [h.strip().lower() for h in header]
        fcol, ccol = pick(columns, FILE_COLUMNS), pick(columns, CAPTION_COLUMNS)
        if fcol is None:
            raise missing_columns(columns, "file", FILE_COLUMNS)
        if ccol is None:
            raise missing_columns(columns, "caption", CAPTION_COLUMNS)
        fi, ci = columns.index(fcol), columns.index(ccol)
        for record in reader:
            if not any(field.strip() for field in record):
                continue  # blank line
            file = record[fi] if fi < len(record) else None
            caption = record[ci] if ci < len(record) else None
            rows.append((reader.line_num, file, caption))
    except csv.Error as e:
        raise malformed(f"line {reader.line_num}: {e}") from None
    if not rows:
        raise malformed("no rows below the header")
    return rows


# ---------------------------------------------------------------------------------------------- datasets


class ImageFileDataset:
    """Base of the image-file datasets: options, the sample contract, substitution of bad files, the probe.

    Subclasses fill ``files`` (source keys) and may override ``_class_id`` / ``_caption``.
    """

    kind = ""

    def __init__(self, root: PathLike, image_size: int, crop: str, flip_prob: float, seed: int,
                 crop_scale: tuple[float, float], crop_ratio: tuple[float, float], min_size: int) -> None:
        _check_options(image_size, crop, flip_prob, seed, crop_scale, crop_ratio, min_size)
        self.root = _check_root(root)
        self.image_size = int(image_size)
        self.crop = crop
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.min_size = int(min_size)
        self.class_map: str | None = None
        self.captions_file: str | None = None
        self.num_classes = 0
        self.files: Sequence[str] = PathList([])
        self.init_issues: list[Issue] = []
        # Indices whose file failed to decode in this process: (kind, detail); never decoded again.
        self._bad: dict[int, tuple[str, str]] = {}
        self.buckets: list[tuple[int, int]] | None = None  # aspect-ratio buckets (use_buckets)
        self.bucket_ids: np.ndarray | None = None
        self._members: list[np.ndarray] = []  # indices of each bucket, sorted

    # ---- per-dataset parts

    def _class_id(self, index: int) -> int:
        return -1

    def _caption(self, index: int) -> str:
        return ""

    # ---- protocol

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        """The stable id of sample ``index``'s source: its path relative to the root."""
        return self.files[index]

    def path(self, index: int) -> str:
        """The file sample ``index`` is decoded from."""
        key = self.files[index]
        return key if os.path.isabs(key) else os.path.join(self.root, key)

    def sample(self, index: int, epoch: int, issues: list[Issue]) -> dict[str, Any]:
        """Exactly sample ``index`` of ``epoch``, or ``BadInput`` (which the caller records).

        ``issues`` are those met before this sample (e.g. files skipped on the way); the sample's
        ``"issues"`` is a new list of them followed by this file's conversions. ``issues`` itself is never
        modified, so a caller that adds the returned ones to its own does not count anything twice.
        """
        index = self._check_index(index)
        key = self.key(index)
        found: list[Issue] = []
        try:
            img = open_rgb(self.path(index), found, name=key, min_size=self.min_size)
        except (BadInput, MemoryError):
            raise
        # A decoder failing in a way open_rgb does not expect (Pillow plugins can raise almost anything on
        # hostile data) is still one bad file, not a reason to stop the run.
        except Exception as e:  # noqa: BLE001
            raise BadInput("skipped:corrupt", f"{type(e).__name__}: {e}") from None
        rng = np.random.default_rng([self.seed, int(epoch), index, 1])
        target = None if self.buckets is None else self.buckets[int(self.bucket_ids[index])]
        out, control = resize_crop_flip(img, self.image_size, self.crop, self.flip_prob, rng,
                                        scale=self.crop_scale, ratio=self.crop_ratio, target=target)
        return {
            "image": to_tensor(out),
            "class_id": self._class_id(index),
            "caption": self._caption(index),
            "control": control,
            "issues": [*issues, *found],
            "key": key,
        }

    def get(self, index: int, epoch: int) -> dict[str, Any]:
        """Sample ``index`` of ``epoch``; an unusable file is reported and replaced by the next index."""
        index = self._check_index(index)
        # Substitutes come from the same bucket, so that a batch keeps one shape.
        pool = None if self.bucket_ids is None else self._members[int(self.bucket_ids[index])]
        start = 0 if pool is None else int(np.searchsorted(pool, index))
        n = len(self) if pool is None else len(pool)
        issues: list[Issue] = []
        tried: list[str] = []
        for k in range(min(MAX_TRIES, n)):
            j = (index + k) % n if pool is None else int(pool[(start + k) % n])
            bad = self._bad.get(j)
            if bad is None:
                try:
                    return self.sample(j, epoch, issues)
                except BadInput as e:
                    bad = self._bad[j] = (e.kind, e.detail)
            key = self.key(j)
            issues.append((key, bad[0], bad[1]))
            tried.append(f"{key} ({bad[0]})")
        raise RuntimeError(
            f"{type(self).__name__}: no usable file among the {len(tried)} tried for sample {index} "
            f"(data.path '{self.root}'): {', '.join(tried)}")

    def describe(self) -> dict[str, Any]:
        """What the samples are made from (JSON-able); a latent cache compares it with its own."""
        return {
            "kind": self.kind,
            "root": os.path.abspath(self.root),
            "class_map": os.path.abspath(self.class_map) if self.class_map else None,
            "captions": os.path.abspath(self.captions_file) if self.captions_file else None,
            "image_size": self.image_size,
            "crop": self.crop,
            "crop_scale": list(self.crop_scale),
            "crop_ratio": list(self.crop_ratio),
            "min_size": self.min_size,
            "num_samples": len(self),
            "num_classes": self.num_classes,
        }

    def use_buckets(self, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
        """Crop every image to the bucket nearest its aspect (``ldmkit.data.buckets``); returns the
        bucket of every index. Reads each file's header once (unreadable files go to the squarest
        bucket and are skipped when decoded)."""
        from ldmkit.data.buckets import image_size_of, nearest_bucket

        if self.crop not in ("center", "random"):
            raise DataError(f"data.crop: aspect-ratio buckets take center or random crops, got {self.crop!r}")
        self.buckets = [(int(h), int(w)) for h, w in buckets]
        square = nearest_bucket(1, 1, self.buckets)
        ids = np.empty(len(self), np.int16)
        for i in range(len(self)):
            hw = image_size_of(self.path(i))
            ids[i] = square if hw is None else nearest_bucket(hw[0], hw[1], self.buckets)
        self.bucket_ids = ids
        self._members = [np.nonzero(ids == b)[0] for b in range(len(self.buckets))]
        return ids

    # ---- helpers

    def _check_index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range [0, {len(self)})")
        return i

    def _probe(self) -> None:
        """Decode files in order until one succeeds (at most ``PROBE_FILES``): fail now, not mid-run."""
        failures: list[str] = []
        for i in range(min(PROBE_FILES, len(self))):
            try:
                self.sample(i, 0, [])
                return
            except BadInput as e:
                self._bad[i] = (e.kind, e.detail)
                failures.append(f"{self.key(i)}: {e.kind} ({e.detail})")
        raise DataError(f"data.path: '{self.root}' holds no usable sample: none of its first {len(failures)} "
                         f"files could be used (data.min_size={self.min_size}): {'; '.join(failures[:3])}"
                         + (" ..." if len(failures) > 3 else ""))


class ImageFolderDataset(ImageFileDataset):
    """ImageNet layout: ``root/<synset>/<image>``, the class of an image is its folder.

    Classes: sorted sub-folder names -> 0..K-1 without ``class_map``; with it, the ids of the map
    (``read_class_map``), which may list classes that have no folder. Images are the files directly in
    each class folder with an extension in ``IMAGE_EXTENSIONS`` (any case), hidden files ignored, in
    sorted order.

    Attributes: ``num_classes``, ``class_names`` (synsets in id order), ``files`` (paths relative to
    ``root``), ``labels`` (class id per file, int32 array), ``init_issues`` (always empty here).
    """

    kind = "imagenet"

    def __init__(self, root: PathLike, image_size: int, crop: str = "center", flip_prob: float = 0.5,
                 seed: int = 0, class_map: PathLike | None = None,
                 crop_scale: tuple[float, float] = (0.5, 1.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 min_size: int = 0) -> None:
        super().__init__(root, image_size, crop, flip_prob, seed, crop_scale, crop_ratio, min_size)
        folders = _subfolders(self.root)
        if class_map is not None:
            self.class_map = os.fspath(class_map)
            self.class_names = read_class_map(self.class_map)
            ids = {name: i for i, name in enumerate(self.class_names)}
            unknown = [f for f in folders if f not in ids]
            if unknown:
                listed = ", ".join(f"'{f}'" for f in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                raise DataError(f"data.class_map: {len(unknown)} class folder(s) of data.path '{self.root}' "
                                 f"are not in '{self.class_map}': {listed}")
        else:
            self.class_names = folders
            ids = {name: i for i, name in enumerate(folders)}
        self.num_classes = len(self.class_names)

        files: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        for folder in folders:
            names = _image_files(os.path.join(self.root, folder))
            files.extend(f"{folder}/{name}" for name in names)
            labels.extend([ids[folder]] * len(names))
            if not names:
                empty.append(folder)
        if files and empty:  # a class folder without images would be a class the model never sees
            listed = ", ".join(f"'{f}'" for f in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"data.path: {len(empty)} class folder(s) of '{self.root}' hold no image files "
                            f"({listed}); add images or remove the folder (data.class_map may list classes "
                            "that have no folder)")
        if not files:
            loose = any(_is_image_name(n) for n in os.listdir(self.root))
            hint = (" (its images are not in class sub-folders: data.name 'folder' with data.captions reads "
                    "a flat folder)") if loose else ""
            raise DataError(f"data.path: '{self.root}' holds no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in class sub-folders <root>/<class>/<image>{hint}")
        self.files = PathList(files)
        self.labels = np.asarray(labels, dtype=np.int32)
        self._probe()

    def _class_id(self, index: int) -> int:
        return int(self.labels[index])


class CaptionFolderDataset(ImageFileDataset):
    """Images under ``root`` listed with their captions in a CSV or JSONL file (``read_captions``).

    File paths are relative to ``root`` (or absolute). ``captions`` itself is a path as given, or else
    relative to ``root``. Rows whose file does not exist or whose caption is empty are dropped at
    construction and recorded in ``init_issues`` (``skipped:missing``, ``skipped:empty_caption``).
    The rows keep their order; a file listed twice (several captions) is two samples with one key.
    """

    kind = "folder"

    def __init__(self, root: PathLike, captions: PathLike, image_size: int, crop: str = "center",
                 flip_prob: float = 0.5, seed: int = 0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), min_size: int = 0) -> None:
        super().__init__(root, image_size, crop, flip_prob, seed, crop_scale, crop_ratio, min_size)
        captions = os.fspath(captions)
        beside = os.path.join(self.root, captions)
        if not os.path.isabs(captions) and not os.path.exists(captions) and os.path.isfile(beside):
            captions = beside
        self.captions_file = captions
        exists = _ExistsCache()
        files: list[str] = []
        texts: list[str] = []
        for line, file, caption in read_captions(captions):
            where = f"{captions}:{line}"
            if file is None or not file.strip():
                self.init_issues.append((where, "skipped:missing", f"line {line}: no file name"))
                continue
            key = _rel_key(file.strip(), self.root)
            path = key if os.path.isabs(key) else os.path.join(self.root, key)
            if not exists(path):
                self.init_issues.append((key, "skipped:missing", f"line {line}: '{path}' does not exist"))
                continue
            if caption is None or not caption.strip():
                self.init_issues.append((key, "skipped:empty_caption", f"line {line}: the caption is empty"))
                continue
            files.append(key)
            texts.append(caption.strip())
        if not files:
            counts: dict[str, int] = {}
            for _, kind, _ in self.init_issues:
                counts[kind] = counts.get(kind, 0) + 1
            first = "; ".join(d for _, _, d in self.init_issues[:3])
            raise DataError(f"data.captions: every row of '{captions}' was dropped "
                             f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}; data.path "
                             f"'{self.root}'): {first}")
        self.files = PathList(files)
        self.captions = PathList(texts)
        self._probe()

    def _caption(self, index: int) -> str:
        return self.captions[index]


def build_image_dataset(cfg: DataConfig, seed: int, flip_prob: float | None = None) -> ImageFileDataset:
    """The image-file dataset ``cfg.name`` asks for (``imagenet`` or ``folder``).

    ``flip_prob`` overrides ``cfg.flip_prob`` (the latent encoder passes 0: flips are applied later).
    """
    flip = cfg.flip_prob if flip_prob is None else flip_prob
    if cfg.name not in ("imagenet", "folder"):
        raise DataError(f"data.name: {cfg.name!r} is not an image-file dataset; expected 'imagenet' or 'folder'")
    if not cfg.path:
        raise DataError(f"data.path: required for data.name={cfg.name!r} (a directory of images)")
    common: dict[str, Any] = {
        "image_size": cfg.image_size, "crop": cfg.crop, "flip_prob": flip, "seed": seed,
        "crop_scale": tuple(cfg.crop_scale), "crop_ratio": tuple(cfg.crop_ratio), "min_size": cfg.min_size,
    }
    if cfg.name == "imagenet":
        return ImageFolderDataset(cfg.path, class_map=cfg.class_map, **common)
    if not cfg.captions:
        raise DataError("data.captions: required for data.name='folder' (a CSV or JSONL file: file, caption)")
    return CaptionFolderDataset(cfg.path, cfg.captions, **common)


def _check_options(image_size: int, crop: str, flip_prob: float, seed: int, crop_scale: Sequence[float],
                   crop_ratio: Sequence[float], min_size: int) -> None:
    """Config-key errors for the options, before any file is touched."""
    if int(image_size) != image_size or image_size < 1:
        raise DataError(f"data.image_size: must be a positive integer, got {image_size!r}")
    if crop not in CROP_MODES:
        raise DataError(f"data.crop: must be one of {CROP_MODES}, got {crop!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise DataError(f"data.flip_prob: must lie in [0, 1], got {flip_prob!r}")
    if int(seed) != seed or seed < 0:
        raise DataError(f"seed: must be a non-negative integer, got {seed!r}")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise DataError(f"data.crop_scale: must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale!r}")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise DataError(f"data.crop_ratio: must be (lo, hi) with 0 < lo <= hi, got {crop_ratio!r}")
    if int(min_size) != min_size or min_size < 0:
        raise DataError(f"data.min_size: must be a non-negative integer, got {min_size!r}")
