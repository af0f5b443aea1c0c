"""The training loop: Adam on random pixel batches, LR schedules, KAN grid updates, best-so-far.

Reads top to bottom: TrainConfig → learning_rate() → Trainer.train(). One step is one batch;
evaluation on the full image every ``eval_every`` steps keeps the best weights.

Under torchrun (kanimg.distributed) the same loop is data-parallel: each rank computes its
share of every batch, DistributedDataParallel averages the gradients, grid updates see the
whole batch on every rank (so the knots are the same everywhere), evaluations add up the
ranks' shares of the image, and a time budget follows the slowest rank's clock.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .errors import KanimgError
from .metrics import psnr_from_mse
from .render import predict
from .sampling import ImageTarget, MappedTarget

SCHEDULES = ("cosine", "constant", "staged")
# fp32: full precision; tf32: float32 matmuls may use TensorFloat-32 (CUDA Ampere and later;
# the default matmul precision elsewhere); bf16: forward and backward under bfloat16 autocast,
# KAN spline layers staying in float32 (kan.py).
PRECISIONS = ("fp32", "tf32", "bf16")
STAGES = 3  # "staged": the KAN paper's three stages at lr, lr/10, lr/100 (fresh Adam each)
COSINE_FLOOR = 0.01  # "cosine" decays to this fraction of the initial learning rate
# Training has diverged when the mean squared error in [-1, 1] value space passes this: an RMS
# error of 10 times the whole value range (PSNR -14 dB), which no fit that is still learning
# reaches (a network that outputs 0 everywhere has an MSE of at most 1).
DIVERGED_MSE = 100.0


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained (recorded in metrics.json and checkpoints).

    Attributes:
        steps: optimisation steps in total.
        lr: initial learning rate.
        batch_size: pixels per step; 0 = the whole image every step.
        schedule: "cosine" (decay to 1 %), "constant", or "staged" (paper: 3 equal stages at
            lr, lr/10, lr/100, each with a fresh optimiser).
        grid_update_every, grid_update_until: KAN grid refits every N steps during the first M
            steps of each stage (0 = never), as in the paper (every 10 in the first 1,000).
        grid_schedule: KAN grid extensions as [[step, [g1, g2, …]], …], e.g. [[1000, [20, 10]]].
        eval_every: full-image evaluation period (the best evaluated weights are kept).
        seed: seeds model initialisation and pixel sampling.
        budget_seconds: if > 0, train for this much training time instead of ``steps``
            (equal wall-clock comparisons); schedules then run on the fraction of time used.
        precision: "fp32", "tf32" or "bf16" for the training steps (see PRECISIONS);
            evaluations and exports are always float32.
        compile: run the training steps through ``torch.compile(model, fullgraph=True)`` (the
            first step, and the first after a grid extension, compile outside the clock).
        lr_steps: the run length ``lr`` was tuned for: a run of S > lr_steps steps starts at
            lr·√(lr_steps / S) (see :func:`length_scale`); 0 = ``lr`` at any length.
    """

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 4096
    schedule: str = "cosine"
    grid_update_every: int = 0
    grid_update_until: int = 0
    grid_schedule: list = field(default_factory=list)
    eval_every: int = 250
    seed: int = 0
    budget_seconds: float = 0.0
    precision: str = "fp32"
    compile: bool = False
    lr_steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise KanimgError(f"steps must be at least 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KanimgError(f"learning rate must be positive and finite, got {self.lr}")
        if self.batch_size < 0:
            raise KanimgError(f"batch size must be 0 (whole image) or positive, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise KanimgError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise KanimgError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if not (self.budget_seconds >= 0 and math.isfinite(self.budget_seconds)):
            raise KanimgError(f"the time budget must be a finite number of seconds, got {self.budget_seconds}")
        if self.grid_update_every < 0 or self.grid_update_until < 0 or self.eval_every < 0:
            raise KanimgError("grid update and eval periods must not be negative")
        if self.lr_steps < 0:
            raise KanimgError(f"lr_steps must be 0 (the rate at any length) or positive, got {self.lr_steps}")
        check_seed(self.seed)
        self.grid_schedule = sorted([int(s), [int(g) for g in grids]] for s, grids in self.grid_schedule)
        for at, grids in self.grid_schedule:
            if at < 0 or not grids or min(grids) < 1:
                raise KanimgError(f"grid extensions need a step >= 0 and positive grid sizes, got {at}:{','.join(map(str, grids))}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from plain values (a checkpoint's, the CLI's); unknown keys and bad types are errors."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise KanimgError(f"unknown training option(s): {', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise KanimgError(f"invalid training options ({exc})") from None

    def to_dict(self) -> dict:
        return asdict(self)


def check_seed(seed: int) -> None:
    """Refuse seeds the random generators cannot take (torch's and numpy's: 0 … 2⁶³ − 1)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise KanimgError(f"the seed must be a whole number from 0 to 2**63 - 1, got {seed!r}")


def stage_of(progress: float, config: TrainConfig) -> int:
    """Index of the stage at ``progress`` ∈ [0, 1] (always 0 unless the schedule is "staged")."""
    return min(STAGES - 1, int(progress * STAGES + 1e-9)) if config.schedule == "staged" else 0


def length_scale(planned_steps: float, config: TrainConfig) -> float:
    """The factor on ``lr`` for a run of ``planned_steps``: √(lr_steps / planned_steps) past
    ``config.lr_steps``, else 1. A rate tuned for short runs is too high for long ones: at four
    times the steps the best rate was half for the KAN, the hash grid and RFF alike
    (docs/benchmark.md), where the cosine decay keeps it near its peak for four times as many
    steps and the loss spikes."""
    if config.lr_steps <= 0 or planned_steps <= config.lr_steps:
        return 1.0
    return math.sqrt(config.lr_steps / planned_steps)


def learning_rate(progress: float, config: TrainConfig, planned_steps: float = 0.0) -> float:
    """Learning rate at ``progress`` ∈ [0, 1] (the fraction of steps, or of the time budget,
    done) of a run of ``planned_steps`` (0: not known yet, taken as short)."""
    lr = config.lr * length_scale(planned_steps, config)
    if config.schedule == "constant":
        return lr
    if config.schedule == "staged":
        return lr * 0.1 ** stage_of(progress, config)
    return lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def grid_update_due(steps_into_stage: int, config: TrainConfig) -> bool:
    """Refit grids now? Every N steps within the first M steps of each stage."""
    if config.grid_update_every <= 0:
        return False
    return steps_into_stage < config.grid_update_until and steps_into_stage % config.grid_update_every == 0


def _check_converging(mse: float, step: int, what: str) -> None:
    if not (math.isfinite(mse) and mse <= DIVERGED_MSE):
        raise KanimgError(f"training diverged: {what} {mse:.3g} at step {step} (values span [-1, 1]); "
                          f"try a lower learning rate (--lr)")


@contextlib.contextmanager
def _matmul_precision(value: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass
class History:
    """Training curves: batch loss and learning rate every LOG_EVERY steps, full-image PSNR at
    each evaluation."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    eval_psnr: list = field(default_factory=list)
    eval_seconds: list = field(default_factory=list)


LOG_EVERY = 10


class Trainer:
    """Fits ``model`` to ``target`` with Adam and MSE in the [-1, 1] value space.

    Args:
        model: maps (N, 2) coordinates to (N, C) values; KANs (``update_grids``,
            ``extend_grids``) get grid updates.
        target: the image as coordinates and values (in memory, or streamed from a map).
        config: how to train.
        progress: show a tqdm bar with live loss and PSNR.
        weights: a parameter transform: ``weights(model)`` gives the tensors (by parameter
            name) that training steps and evaluations run the model with, e.g. fake-quantised
            ones for quantisation-aware fine-tuning; gradients reach the model's own parameters
            through it. Parameters with ``requires_grad`` False are not optimised.
    """

    def __init__(self, model: nn.Module, target: ImageTarget | MappedTarget, config: TrainConfig, progress: bool = True,
                 weights: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None) -> None:
        self.model, self.target, self.config, self.progress, self.weights = model, target, config, progress, weights
        self.device = target.device
        self.place = distributed.world()
        if self.place.size > 1 and (config.compile or weights is not None):
            raise KanimgError("data-parallel training (torchrun) runs eager, without --compile or a weight transform")
        self.sampler = target.sampler(config.batch_size, seed=config.seed, share=(self.place.rank, self.place.size))
        self.step = 0
        self.stage, self.stage_start = 0, 0  # current stage and the step it began at
        self.train_seconds = 0.0
        self.history = History()
        self.best_psnr, self.best_step = -math.inf, 0
        self.best_state: dict | None = None
        self.best_spec: dict | None = None
        self.warmup_seconds = 0.0  # outside train_seconds: see warm_up
        # The training steps' forward: the model itself, or its compiled graph (under torchrun:
        # the model in DistributedDataParallel, see _new_optimizer).
        self.step_model = torch.compile(model, fullgraph=True) if config.compile else model
        self.optimizer = self._new_optimizer()

    def fraction_done(self) -> float:
        """Progress in [0, 1]: of the steps, or of the time budget when there is one."""
        cfg = self.config
        return self.train_seconds / cfg.budget_seconds if cfg.budget_seconds > 0 else self.step / cfg.steps

    def planned_steps(self) -> float:
        """The steps this run will make: ``steps``, or under a time budget the pace so far
        carried to the budget's end (0 before the first step). The ranks agree on it, as on
        the clock."""
        cfg = self.config
        if cfg.budget_seconds <= 0:
            return float(cfg.steps)
        return self.step * cfg.budget_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    def current_lr(self) -> float:
        """The learning rate of the next step."""
        return learning_rate(self.fraction_done(), self.config, self.planned_steps())

    # ------------------------------------------------------------------ the loop
    def train(self, on_step: Callable[["Trainer"], None] | None = None) -> None:
        """Run until ``config.steps`` (or the time budget); continues from ``self.step`` after a resume.
        ``on_step(trainer)`` is called after every step (e.g. for periodic checkpoints).

        Raises:
            KanimgError: training diverged (a loss that is NaN, infinite or above DIVERGED_MSE).
            KeyboardInterrupt: propagated after the current step; the state stays consistent.
        """
        cfg = self.config
        if self.place.size > 1 and not isinstance(self.step_model, DistributedDataParallel):
            self._wrap_for_ranks()  # a second train() after the first released its wrapper
        self.warmup_seconds += self.warm_up()
        total = None if cfg.budget_seconds > 0 else cfg.steps
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True, leave=False)
        try:
            with distributed.deferred_interrupts(self.place) as stop:
                while self.fraction_done() < 1:
                    t0 = time.perf_counter()
                    paused = self._before_step()
                    coords, values = self.sampler.next_batch()
                    with self.precision():
                        loss = self._loss(coords, values)
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    self.optimizer.step()
                    self.step += 1
                    self.train_seconds += time.perf_counter() - t0 - paused
                    if self.place.size > 1:  # the ranks agree on the clock (a budget ends at one step) and on stopping
                        self.train_seconds, stopping = distributed.agree([self.train_seconds, stop.requested])
                        if stopping:
                            raise KeyboardInterrupt
                    last = self.fraction_done() >= 1
                    if self.step % LOG_EVERY == 0 or last:
                        value = self._global(loss.detach())
                        _check_converging(value, self.step, "loss")
                        self.history.step.append(self.step)
                        self.history.loss.append(value)
                        self.history.lr.append(self.optimizer.param_groups[0]["lr"])
                        bar.set_postfix(loss=f"{value:.2e}", psnr=f"{psnr_from_mse(value, 2.0):.2f}",
                                        best=f"{self.best_psnr:.2f}", refresh=False)
                    bar.update(1)
                    if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                        self.evaluate()
                    if on_step is not None:
                        on_step(self)
        finally:
            bar.close()
            if self.place.size > 1:
                # The wrapper holds the process group: released here, it goes before the group is
                # destroyed; left to interpreter exit, gloo's teardown there can abort the process.
                self.step_model = self.model

    def warm_up(self) -> float:
        """One forward and backward pass on a batch of pixels, outside the clock; returns its
        seconds. A model's first pass builds or loads its kernels (the KAN's CPU kernel compiles
        once per machine, about a minute) and allocates its buffers: a time budget counts
        training, not that; nor ``torch.compile``'s compilation. Changes nothing: no optimiser
        step, no sampler draw, gradients dropped."""
        started = time.perf_counter()
        coords, values = self.target.batch(torch.arange(max(1, self.sampler.batch_size // self.place.size)))
        with self.precision():
            nn.functional.mse_loss(self.forward(coords), values).backward()
        self.model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def forward(self, coords: torch.Tensor, compiled: bool = True) -> torch.Tensor:
        """The model's outputs as training sees them (through ``weights`` when there is one)."""
        if self.weights is not None:
            return functional_call(self.model, self.weights(self.model), (coords,))
        return (self.step_model if compiled else self.model)(coords)

    def precision(self) -> contextlib.AbstractContextManager:
        """The numeric precision of a training step (TrainConfig.precision)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.precision == "tf32":
            return _matmul_precision("high")
        return contextlib.nullcontext()

    def _before_step(self) -> float:
        """Stage changes, scheduled grid extensions, grid refits and the LR for this step.
        Returns the seconds spent recompiling (a grid extension changes the compiled graph),
        which the clock does not count."""
        cfg, step = self.config, self.step
        graph = self._graph_key() if cfg.compile else None
        progress = self.fraction_done()
        stage = stage_of(progress, cfg)
        if stage != self.stage:
            self.stage, self.stage_start = stage, step
            self.optimizer = self._new_optimizer()  # the paper restarts Adam each stage
        for at, grids in cfg.grid_schedule:
            if at == step and hasattr(self.model, "extend_grids"):
                self.model.extend_grids(grids)
                self.model.spec["grids"] = list(self.model.grids)
                self.optimizer = self._new_optimizer()  # parameters changed shape
        if grid_update_due(step - self.stage_start, cfg) and hasattr(self.model, "update_grids"):
            coords, _ = self.sampler.next_batch(whole=True)
            self.model.update_grids(coords)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.compile and self._graph_key() != graph:
            paused = self.warm_up()
            self.warmup_seconds += paused
            return paused
        return 0.0

    def _graph_key(self) -> tuple:
        """What a compiled graph depends on beyond shapes of inputs: KAN grid sizes and knot kinds."""
        return tuple((getattr(m, "grid_size", None), getattr(m, "has_uniform_knots", None)) for m in self.model.modules())

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh Adam over the model's parameters (at the start, a stage change, a grid
        extension); under torchrun also a fresh DistributedDataParallel around the model, whose
        parameters may have changed shape."""
        if self.place.size > 1:
            self._wrap_for_ranks()
        fused = self.device.type in ("cpu", "cuda")
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.current_lr(), fused=fused)

    def _wrap_for_ranks(self) -> None:
        """DistributedDataParallel around the model: every rank's step averages the gradients."""
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else None
        self.step_model = DistributedDataParallel(self.model, device_ids=ids)

    def _loss(self, coords: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The batch's MSE. Under torchrun a rank's share counts as its part of the whole batch's
        mean (times the world size, which DDP's gradient averaging divides out), so every pixel
        weighs the same whatever the shares' sizes."""
        if self.place.size == 1:
            return nn.functional.mse_loss(self.forward(coords), values)
        squared = nn.functional.mse_loss(self.forward(coords), values, reduction="sum")
        return squared * (self.place.size / (self.sampler.whole_count * values.shape[1]))

    def _global(self, loss: torch.Tensor) -> float:
        """The whole batch's loss from a rank's :meth:`_loss` (itself in a single process)."""
        return distributed.total(self.place, loss) / self.place.size

    @torch.no_grad()
    def evaluate(self) -> float:
        """Full-image PSNR (dB, [0, 1] scale, unclipped); keeps the best weights. Under torchrun
        each rank predicts its share of the pixels and the squared errors are added up."""
        squared = 0.0
        for coords, values in self.target.share(self.place.rank, self.place.size):
            prediction = predict(self.model, coords, forward=lambda part: self.forward(part, compiled=False))
            squared += nn.functional.mse_loss(prediction, values, reduction="sum").item()
        mse = distributed.total(self.place, squared) / (self.target.count * self.target.channels)
        _check_converging(mse, self.step, "full-image error")
        value = psnr_from_mse(mse, 2.0)  # values span [-1, 1]: peak-to-peak 2
        self.history.eval_step.append(self.step)
        self.history.eval_psnr.append(value)
        self.history.eval_seconds.append(self.train_seconds)
        if value > self.best_psnr:
            self.best_psnr, self.best_step = value, self.step
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_spec = copy.deepcopy(getattr(self.model, "spec", None))
        return value

    def evaluate_if_stale(self) -> None:
        """Evaluate unless the last evaluation was at this step (after an interruption, so the
        best weights account for the training done since)."""
        if not self.history.eval_step or self.history.eval_step[-1] != self.step:
            self.evaluate()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where training stopped (tensors and plain types)."""
        return {
            "step": self.step,
            "stage": self.stage,
            "stage_start": self.stage_start,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "spec": copy.deepcopy(getattr(self.model, "spec", None)),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "history": asdict(self.history),
            "best_psnr": self.best_psnr,
            "best_step": self.best_step,
            "best_model": self.best_state,
            "best_spec": self.best_spec,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the model must already have the saved architecture."""
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self.stage, self.stage_start = int(state["stage"]), int(state["stage_start"])
        self.train_seconds = float(state["train_seconds"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = History(**{"lr": [None] * len(state["history"]["step"]), **state["history"]})  # none before 2026-12-05
        self.best_psnr, self.best_step = float(state["best_psnr"]), int(state["best_step"])
        self.best_state, self.best_spec = state["best_model"], state["best_spec"]
