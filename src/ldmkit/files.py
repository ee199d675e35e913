"""Files written atomically and read safely.

Every writer goes to a hidden temporary file in the same directory, flushes it to disk and renames it
into place (a rename within one filesystem is atomic), so a crash or a kill never leaves half a file.
Torch files are read with ``weights_only=True``, which refuses to unpickle anything but tensors and
plain values, and a file that cannot be read is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator

from ldmkit.errors import CheckpointError


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temporary name beside ``path`` that is written first (per process: ranks never share it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (with any writer that takes a file name); when the
    block ends without an error it is flushed to disk and renamed to ``path``, else removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then move it to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a damaged file or a pickle of anything but
    tensors and plain values is a one-line ``CheckpointError`` naming ``what`` and ``path``."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} {str(path)!r} holds objects other than tensors and plain values; refusing "
                              f"to unpickle it ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
