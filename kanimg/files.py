"""File-system helpers: atomic writes, so no reader (or crash) ever sees a half-written output."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name beside ``path``; on success it replaces ``path`` in one rename,
    so readers never see a half-written file and a failure leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get normal permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


class RunFolder:
    """A run's output folder, built in a hidden staging folder and moved into place at the end.

    A run that fails leaves nothing behind (and an older result in ``final`` stays intact); an
    existing folder is only replaced when ``replace`` is set.

        with RunFolder(Path("runs/photo-kan"), replace=False) as staging:
            ...write files into staging...
        # here runs/photo-kan holds them; on an exception it is untouched
    """

    def __init__(self, final: Path, replace: bool = False) -> None:
        from .errors import KanimgError

        self.final = Path(final)
        if self.final.exists() and not self.final.is_dir():
            raise KanimgError(f"{self.final} exists and is not a folder")
        if self.final.exists() and not replace:
            raise KanimgError(f"{self.final} already exists; pass --force to overwrite it (or -o to choose another folder)")
        self.staging = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        shutil.rmtree(old, ignore_errors=True)
