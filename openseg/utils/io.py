"""Files that are either complete or absent: write to a temporary file, fsync, rename.

A checkpoint or metrics file cut short (Ctrl-C during the write, full disk, pre-emption) must
never sit under its final name, where `--resume` or a reader would take it for a real one.
`os.replace` is atomic within one file system, so readers see the old file or the new one.
"""
import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_text"]


@contextlib.contextmanager
def atomic_open(path: os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on a clean exit of the `with` block
    it is flushed, fsync'ed and renamed to `path` (and the folder entry fsync'ed). On an
    exception (or KeyboardInterrupt) the temporary file is removed and `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)
