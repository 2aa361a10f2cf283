"""Atomic file writes: a process killed mid-write never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class _RecordingStream:
    """A binary file that remembers the first OSError of a write: writers such as torch.save report a failed
    write (a full disk) as their own RuntimeError, and the cause is what the user needs to read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, durable: bool = True) -> Path:
    """Call `write(stream)` on a temporary file in `path`'s folder, fsync it, then rename it over `path`.

    durable=False skips the fsync, for files that are checked when read and rebuilt when damaged (cache entries):
    a killed process still leaves the old file or the whole new one; only a machine crash could leave the new
    name with incomplete contents.

    A failure at any point (a full disk included) leaves `path` as it was and removes the temporary file; a
    failed write raises the OSError that caused it, whatever the writer made of it. The file gets the
    permissions a plain `open(path, "wb")` would give (0666 less the umask), not the owner-only mode of the
    temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recording = None
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            recording = _RecordingStream(stream)
            write(recording)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if recording is not None and recording.error is not None and recording.error is not error:
            raise recording.error from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) atomically: never a truncated or empty file, even on a full disk."""
    return atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete the temporary files a killed `atomic_write` of `path` left behind; returns how many."""
    path = Path(path)
    count = 0
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
        count += 1
    return count
