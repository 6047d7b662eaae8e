"""Safe file output: atomic writes (temp file + rename) and the checksum every artifact carries.

A reader either sees the old file or the complete new one, never a partial
write: the data goes to a temporary file in the same folder, is flushed to
disk, then renamed over the target; if anything raises (Ctrl-C included) the
temporary file is removed and the target is left as it was. CRC-32 (zlib's,
IEEE 802.3 polynomial) is the project's checksum for packed streams and artifacts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@contextlib.contextmanager
def temp_file_in(folder: Path, name: str) -> Iterator[tuple[BinaryIO, Path]]:
    """A temporary file (normal permissions) in ``folder``; removed if the block raises."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)          # mkstemp makes 0600
        with os.fdopen(fd, "w+b") as f:
            yield f, tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Stream a file to ``path``: renamed into place when the block ends normally."""
    path = Path(path)
    with temp_file_in(path.parent, path.name) as (f, tmp):
        yield f
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that an interruption leaves no partial file."""
    with atomic_output(path) as f:
        f.write(data)
