"""Files written whole or not at all: a temporary file beside the target, then one rename over it.

A reader (or a crash) never sees half a file under the final name: until the rename it sees the
previous file, after it the new one, and a write that fails leaves no temporary file behind. This
module imports nothing of moeinf, so every floor (kernels, loaders, runtime) and the benchmarks
may use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Yields a file opened with `mode` ("wb" or "w") on a temporary file in `path`'s folder; when
    the block ends without an exception, the file is flushed, made readable by others (0644, as a
    plain open would leave it; mkstemp makes 0600), and renamed over `path`. With `durable`, the
    data and the rename are fsynced first, so they survive a power cut too. On an exception the
    temporary file is removed and `path` is untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: expected mode 'wb' or 'w', found {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through atomic_write, creating its folder if need be (not fsynced:
    results and configs, not data)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", durable=False) as f:
        f.write(text)


def fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable; some file systems cannot open a folder, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
