"""Safe file output: atomic writes (temp file + rename) and the checksum every artifact carries.

A reader either sees the old file or the complete new one, never a partial
write: the data goes to a temporary file in the same folder, is flushed to
disk, then renamed over the target. CRC-32 (zlib's, IEEE 802.3 polynomial) is
the project's checksum for packed streams and artifacts.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that an interruption leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
