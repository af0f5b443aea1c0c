"""Many processes, one experiment: torch.distributed under torchrun.

``torchrun --standalone --nproc-per-node N -m kanimg compare|rd …`` starts N copies of the
command. Each knows its place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE); the list of work (image × model runs, image × network × bit-rate points)
is the same in every copy, and rank r takes items r, r + N, r + 2N, …; rank 0 checks the
output folder before any work and merges at the end. torch.distributed carries the little
that travels (who ran what, whether the folder was accepted); nothing here sends or
schedules anything itself. With no torchrun around, a command is one rank of one.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import KanimgError

T = TypeVar("T")
# How long a rank waits for the others at a meeting point: a comparison's ranks meet only at
# the start and the end, so one rank may wait for hours while another still trains.
MEETING_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the command's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's (index, item) pairs of ``items``: every size-th one from its rank on."""
        return [(i, item) for i, item in enumerate(items) if i % self.size == self.rank]


def from_environment() -> World:
    """The world torchrun describes in the environment (one process without it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise KanimgError("torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) holds something that is not a number") from None
    if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
        raise KanimgError(f"inconsistent torchrun environment: RANK {rank} of WORLD_SIZE {size}, LOCAL_RANK {local_rank}")
    return World(rank, size, local_rank, max(local_size, 1))


_alone = 0  # depth of alone() blocks


def world() -> World:
    """The world of the process group this process has joined (one process if none, or
    inside :func:`alone`)."""
    if dist.is_available() and dist.is_initialized() and not _alone:
        here = from_environment()
        return World(dist.get_rank(), dist.get_world_size(), here.local_rank, here.local_size)
    return World()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within this block the process is a world of one: the runs a rank takes from a shared-out
    experiment (compare, rd) train on their own, not data-parallel with the other ranks."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


@contextlib.contextmanager
def joined() -> Iterator[World]:
    """Join torchrun's process group for the length of a command, when there is one.

    Each rank gets its own GPU (LOCAL_RANK) when there are GPUs, else an equal share of the
    machine's CPU threads. CPU tensors and Python objects travel by gloo, CUDA tensors (a
    data-parallel fit's gradients on GPUs) by NCCL.
    """
    here = from_environment()
    if here.size == 1 or dist.is_initialized():
        yield world() if here.size > 1 else here
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // here.local_size))
        backend = "gloo"
    dist.init_process_group(backend, timeout=MEETING_TIMEOUT)
    try:
        yield here
        _leave_together()
    finally:
        dist.destroy_process_group()


def _leave_together() -> None:
    """Wait until every rank has finished the command. Without this a rank that has done its
    share (its rd points, its comparison runs) tears down its connections and exits while rank 0
    still measures and writes the results; once (in CI) such a rank aborted after its share
    (gloo, "terminate called without an active exception"), and torchrun then stopped rank 0
    before it had published the folder."""
    try:
        dist.all_reduce(torch.zeros(1))  # a barrier on a CPU tensor: gloo carries it, NCCL beside it or not
    except RuntimeError:  # a rank failed or was stopped after the last meeting point; it said why
        raise KanimgError("another rank stopped before the end of the command") from None


def main_first(place: World, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 while the others wait; every rank gets its result (it must
    pickle), or fails as rank 0 did — so a refused folder stops every rank with its line."""
    if place.size == 1:
        return action()
    box: list[Any] = [None]
    if place.is_main:
        try:
            box = [("ok", action())]
        except BaseException as exc:
            message = str(exc) if isinstance(exc, KanimgError) else f"rank 0 failed ({type(exc).__name__}: {exc})"
            dist.broadcast_object_list([("interrupted" if isinstance(exc, KeyboardInterrupt) else "error", message)], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "error":
        raise KanimgError(value)
    return value


def gather(place: World, value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on rank 0 (an empty list elsewhere); a meeting
    point: it returns when every rank has got here."""
    if place.size == 1:
        return [value]
    values: list[Any] | None = [None] * place.size if place.is_main else None
    dist.gather_object(value, values, dst=0)
    return values if place.is_main else []


class Stop:
    """Whether Ctrl-C or SIGTERM has asked this process to stop (see :func:`deferred_interrupts`)."""

    requested = False


@contextlib.contextmanager
def deferred_interrupts(place: World) -> Iterator[Stop]:
    """In data-parallel training, Ctrl-C and SIGTERM only set ``Stop.requested``; the ranks
    then agree (:func:`agree`) to stop at the same step, never inside a collective. A single
    process keeps the usual KeyboardInterrupt."""
    stop = Stop()
    if place.size == 1:
        yield stop
        return

    def request(signum, frame) -> None:
        stop.requested = True

    try:
        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        previous = {}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def agree(values: Sequence[float]) -> list[float]:
    """The largest of each value over the ranks (every rank gets them): one small all-reduce."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def total(place: World, value: float | torch.Tensor) -> float:
    """The sum of a number over the ranks (every rank gets it; the number itself in one process)."""
    value = float(value)
    if place.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item()
