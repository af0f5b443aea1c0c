"""The training state an encode keeps while it trains, so that Ctrl-C or a kill costs at most
CHECKPOINT_SECONDS of it: the caller names a file with :func:`resumable` (``kanimg compress``
beside its output, ``kanimg rd`` beside each point's), the codecs' trainings keep their state
there and continue from it when it is the same training's, and the caller removes the file
once its output is written."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..files import atomic_path
from ..io import ImageData

log = logging.getLogger(__name__)
CHECKPOINT_SECONDS = 30.0
_STATE_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("encode_state_file", default=None)


@contextlib.contextmanager
def resumable(path: Path) -> Iterator[None]:
    """Within it, an encode's training keeps its state in ``path`` and continues from it."""
    token = _STATE_FILE.set(Path(path))
    try:
        yield
    finally:
        _STATE_FILE.reset(token)


def state_file() -> Path | None:
    """The file the encode in progress keeps its state in (None outside :func:`resumable`)."""
    return _STATE_FILE.get()


def training_key(image: ImageData, **settings: Any) -> dict[str, Any]:
    """What tells one training from another: the image's pixels and shape, every setting it
    ran with, and the kanimg that ran it (whose state other code may not read, or read as its own)."""
    from .. import __version__
    from ..results import source_digest

    return {"pixels_sha256": pixels_sha256(image), "shape": list(image.pixels.shape), "kanimg": __version__,
            "kanimg_source": source_digest(), **settings}


def pixels_sha256(image: ImageData) -> str:
    """A digest of the image's pixels (what rd's kept points and kept trainings are keyed by)."""
    return hashlib.sha256(np.ascontiguousarray(image.pixels).tobytes()).hexdigest()[:32]


def saved_state(path: Path | None, key: dict[str, Any], model: torch.nn.Module,
                weights: Sequence[str] = ("model",)) -> dict[str, Any] | None:
    """The state ``path`` holds of the training ``key`` names, whose weights (at ``weights``
    in it) fit ``model`` name for name and shape for shape; None if there is none, or it is
    another training's, or it cannot be read (that training starts over and replaces it)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # writes are atomic, so a kill leaves none half-written; any damage means: start over
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    try:
        saved = state
        for name in weights:
            saved = saved[name]
        ours = model.state_dict()
        fits = saved.keys() == ours.keys() and all(getattr(saved[k], "shape", None) == getattr(v, "shape", None)
                                                   for k, v in ours.items())  # extra state (a KAN's knots) has none
    except (KeyError, TypeError, AttributeError):
        fits = False
    if not fits:
        log.warning("the training state in %s does not fit this training; starting over", path)
    return state if fits else None


def keep_state(path: Path, key: dict[str, Any], **state: Any) -> bool:
    """Write the training's state (atomically: a kill leaves the previous one). False when it
    cannot be written (a full disk): the encode goes on without it, as it would have before."""
    try:
        with atomic_path(path) as tmp:
            torch.save({"key": key, **state}, tmp)
    except OSError as exc:
        log.warning("cannot keep the training state in %s (%s); going on without it", path, exc.strerror or exc)
        return False
    return True


class StateKeeper:
    """Keeps a training's state (``state()``, built only when due) in ``path`` every
    CHECKPOINT_SECONDS and at its last step; after a write that fails it keeps no more.

    An encode's later phases (the KAN codec's bit allocation and fine-tuning) go on in the same
    file: :meth:`hold` carries a finished phase's state into every later write, :meth:`keep`
    writes a phase's result at once, and ``resumed`` is what the file held when the encode
    started (the phases read their own entries back from it)."""

    def __init__(self, path: Path | None, key: dict[str, Any], resumed: dict[str, Any] | None = None) -> None:
        self.path, self.key, self.last = path, key, time.monotonic()
        self.resumed, self.held, self.interrupted = resumed or {}, {}, False

    def __call__(self, final: bool, state: Callable[[], dict[str, Any]]) -> None:
        """At the end of each step: keep the state when due, or when Ctrl-C came (then stop)."""
        if self.path is not None and (final or self.interrupted or time.monotonic() - self.last >= CHECKPOINT_SECONDS):
            self._write({**self.held, **state()})
        if self.interrupted:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def holding_interrupts(self) -> Iterator[None]:
        """Within it (a training loop that calls the keeper at each step's end), Ctrl-C stops the
        training at the end of its step, once that step's state is kept: the same command then
        loses nothing (a kill -9 still loses up to CHECKPOINT_SECONDS). A second Ctrl-C stops at
        once. SIGTERM is held the same way where Python handles it (the command line turns it into
        Ctrl-C: a scheduler's SIGTERM before its SIGKILL); a signal ignored or left to the system
        stays so."""
        def hold(signum, frame) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                if callable(signal.getsignal(sig)):  # not SIG_IGN (a background job), SIG_DFL or a foreign handler
                    previous[sig] = signal.signal(sig, hold)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.interrupted:  # it came after the last step's keeping (a resumed training with no step left)
            raise KeyboardInterrupt

    def hold(self, **entries: Any) -> None:
        """Write ``entries`` with every later state (not now)."""
        self.held.update(entries)

    def keep(self, **entries: Any) -> None:
        """Hold ``entries`` and write them now."""
        self.hold(**entries)
        if self.path is not None:
            self._write(self.held)

    def _write(self, state: dict[str, Any]) -> None:
        if not keep_state(self.path, self.key, **state):
            self.path = None
        self.last = time.monotonic()
