"""File-system helpers: atomic writes, output locks and run folders, so that no reader (or
crash, or second process) ever sees a half-written output, and nothing the user did not ask
to replace is ever deleted."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import KanimgError

MARKER = ".kanimg"  # in every folder kanimg builds: {"kind": ...}; only such folders are ever replaced
# Folders written before the marker existed, recognised by their outputs.
_LEGACY_OUTPUTS = ({"metrics.json", "checkpoint.pt"}, {"results.json", "rd.png"}, {"results.json", "index.html"})


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


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (inf/NaN become null, tensors plain lists)."""
    atomic_write_bytes(Path(path), (json.dumps(_jsonable(payload), indent=2) + "\n").encode())


def as_stored(value: Any) -> Any:
    """``value`` as a JSON file gives it back (tuples as lists, keys as strings), to compare a
    setting with one read from a run's files."""
    return json.loads(json.dumps(value))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (float, int)):  # tensors, numpy arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def file_sha256(path: Path) -> str | None:
    """The file's SHA-256 (hex), read in blocks; None when it cannot be read. It tells an
    edited photo from the one a run was fitted on, whatever its name and size."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def check_writable(folder: Path) -> None:
    """Fail now, not after hours of training, when ``folder`` cannot take a new file (missing,
    read-only, or a full disk: a few real bytes are written and flushed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KanimgError(f"{folder}: no such folder" if not folder.exists() else f"{folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".kanimg-write-test-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise KanimgError(f"{folder}: cannot write there ({exc.strerror or exc})") from None


@contextmanager
def claimed_output_file(out: Path, force: bool, source: Path | None = None) -> Iterator[Path]:
    """Hold the output file ``out`` while the work that writes it runs: its folder checked, then
    locked against other kanimg processes (:class:`OutputLock`), then refused, before any work,
    if it is a folder, anything but a regular file (--force replaces files, never devices), the
    input ``source`` itself, or an existing file without --force."""
    out = Path(out)
    check_writable(out.parent)  # before the lock, whose file goes there
    with OutputLock(out):
        _check_output_file(out, force, source)
        yield out


def _check_output_file(out: Path, force: bool, source: Path | None) -> None:
    if out.is_dir():
        raise KanimgError(f"{out} is a folder, not a file")
    if out.exists() and not out.is_file():
        raise KanimgError(f"{out} is not a regular file; refusing to replace it (choose another -o)")
    if source is not None and out.exists() and source.exists() and os.path.samefile(out, source):
        raise KanimgError(f"{out} is the input; refusing to replace it (choose another -o)")
    if out.exists() and not force:
        raise KanimgError(f"{out} already exists; pass --force to overwrite it")


def check_replaceable(path: Path) -> None:
    """Refuse to replace anything but a folder kanimg built (or an empty one), and never the
    working folder or one of its parents, whatever --force says."""
    path = Path(path)
    resolved = path.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise KanimgError(f"{path}: refusing to replace the current folder or one above it; choose another -o")
    if not path.is_dir():
        return
    names = {p.name for p in path.iterdir()}
    if names and MARKER not in names and not any(outputs <= names for outputs in _LEGACY_OUTPUTS):
        raise KanimgError(f"{path} is not a folder kanimg wrote; refusing to replace it even with --force (choose another -o)")


def write_marker(folder: Path, kind: str, **info) -> None:
    atomic_write_bytes(Path(folder) / MARKER, json.dumps({"kind": kind, **info}, indent=2).encode())


def read_json_object(path: Path) -> dict | None:
    """A JSON object kanimg wrote, or None when the file is missing, damaged or holds something
    else: whoever reads it then treats it as absent, never as valid."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder kanimg built, or None (no marker, or an unreadable one)."""
    return read_json_object(Path(folder) / MARKER)


class OutputLock:
    """An exclusive lock on one output path, held while a process writes it: a second kanimg
    writing the same output gets a clear error instead of silently replacing the first's result.

    The lock is an ``flock`` on the hidden file ``.NAME.lock`` beside the output, so the kernel
    releases it when its process dies, even by SIGKILL; the file is removed on release.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise KanimgError(f"{self.target} is being written by another kanimg process (pid {owner}); "
                                      f"wait for it to finish or choose another -o") from None
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still holding the lock: nobody else can be past it
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """An output folder built in a hidden staging folder beside it, ``.NAME.partial``, locked
    while in use and moved into place in one rename at the end.

    The staging folder has a fixed name, so the work it holds (e.g. a periodic checkpoint, or
    finished points of an RD sweep) survives a crash or a SIGKILL and the next run of the same
    output finds it; what to do with it is the caller's choice (``leftover`` says it is there;
    :meth:`clear` empties it). A run that fails keeps its staging folder when it holds
    anything, so nothing is lost; an older result in ``final`` stays intact until the end.
    An existing ``final`` is only replaced when ``replace`` is set, and only if kanimg built it;
    with ``keep_others`` (a folder whose outputs have fixed names, such as a fit's: anything
    else in it is the user's, e.g. a render) what the new folder does not hold is carried over.

        with RunFolder(Path("runs/photo-kan"), kind="fit") as staging:
            ...write files into staging...
        # here runs/photo-kan holds them
    """

    def __init__(self, final: Path, kind: str, replace: bool = False, keep_others: bool = False) -> None:
        self.final, self.kind, self.keep_others = Path(final), kind, keep_others
        if self.final.exists() and not self.final.is_dir():
            raise KanimgError(f"{self.final} exists and is not a folder")
        check_replaceable(self.final)  # first: where --force would not replace it either, say so, not "pass --force"
        if self.final.exists() and not replace:
            raise KanimgError(f"{self.final} already exists; pass --force to overwrite it (or -o to choose another folder)")
        self.staging = staging_folder(self.final)
        self.lock = OutputLock(self.final)
        self.leftover = False

    def __enter__(self) -> Path:
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KanimgError(f"{parent}: cannot create the folder ({exc.strerror or exc})") from None
        check_writable(parent)
        self.lock.__enter__()
        try:
            _remove_legacy_partials(self.final)
            self.leftover = self.staging.is_dir() and any(p.name != MARKER for p in self.staging.iterdir())
            self.staging.mkdir(exist_ok=True)
            write_marker(self.staging, self.kind)
        except BaseException:
            self.lock.__exit__()
            raise
        return self.staging

    def clear(self) -> None:
        """Empty the staging folder (the caller decided its leftover work is not wanted)."""
        for entry in self.staging.iterdir():
            if entry.name != MARKER:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.leftover = False

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                if self.staging.is_dir() and not any(p.name != MARKER for p in self.staging.iterdir()):
                    shutil.rmtree(self.staging, ignore_errors=True)
                return
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            if self.final.exists():
                if self.keep_others and (read_marker(self.final) or {}).get("kind", self.kind) == self.kind:
                    carry_over(self.final, self.staging)
                os.replace(self.final, old)
            os.replace(self.staging, self.final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            self.lock.__exit__()


def carry_over(source: Path, target: Path, top: bool = True) -> None:
    """Put into ``target`` what ``source`` holds and it does not, folders merged entry by
    entry, as hard links where the file system allows (else copies, each complete before it
    is named), so ``source`` stays whole until it is replaced and a kill midway loses nothing:
    the next carry-over finishes the job."""
    for entry in source.iterdir():
        dest = target / entry.name
        if top and entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if not dest.is_symlink() and not (dest.exists() and not dest.is_dir()):
                dest.mkdir(exist_ok=True)
                carry_over(entry, dest, top=False)
        elif not (dest.exists() or dest.is_symlink()):
            try:
                os.link(entry, dest, follow_symlinks=False)
            except OSError:  # a file system without hard links
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), dest)
                else:
                    with atomic_path(dest) as tmp:
                        shutil.copy2(entry, tmp)


def staging_folder(final: Path) -> Path:
    """Where a run folder is built: ``.NAME.partial`` beside it."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _remove_legacy_partials(final: Path) -> None:
    """Left-overs of processes that are gone: staging folders of older kanimg versions
    (``.NAME.partial-PID``, which never held a checkpoint) and replaced results whose removal
    was cut short (``.NAME.old-PID``, replaced on purpose): nothing in them to keep."""
    for pattern in (f".{final.name}.partial-*", f".{final.name}.old-*"):
        for folder in final.parent.glob(pattern):
            pid = folder.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
