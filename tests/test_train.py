"""Schedules, stages, grid updates and time budgets in the trainer."""
import copy

import numpy as np
import pytest
import torch

from conftest import photo_crop
from kanimg.errors import KanimgError
from kanimg.models import build_model
from kanimg.sampling import ImageTarget
from kanimg.train import DIVERGED_MSE, Trainer, TrainConfig, grid_update_due, learning_rate, stage_of


def test_learning_rate_schedules():
    staged = TrainConfig(steps=15000, lr=1e-3, schedule="staged")
    assert [learning_rate(p, staged) for p in (0, 4999 / 15000, 5000 / 15000, 10000 / 15000, 14999 / 15000)] == \
        pytest.approx([1e-3, 1e-3, 1e-4, 1e-5, 1e-5])
    assert [stage_of(p, staged) for p in (0, 0.34, 0.67, 1.0)] == [0, 1, 2, 2]
    cosine = TrainConfig(lr=1e-2, schedule="cosine")
    assert learning_rate(0, cosine) == pytest.approx(1e-2)
    assert learning_rate(0.5, cosine) == pytest.approx(1e-2 * (0.01 + 0.99 * 0.5))
    assert learning_rate(1, cosine) == pytest.approx(1e-4)
    assert learning_rate(0.7, TrainConfig(lr=3e-3, schedule="constant")) == 3e-3


def test_a_run_longer_than_lr_steps_starts_at_a_lower_rate():
    """√(lr_steps / steps) past lr_steps: four times the steps, half the rate; the schedule on top."""
    cosine = TrainConfig(lr=1e-2, lr_steps=2000)
    assert learning_rate(0, cosine, 8000) == pytest.approx(5e-3)
    assert learning_rate(0.5, cosine, 8000) == pytest.approx(5e-3 * (0.01 + 0.99 * 0.5))
    assert learning_rate(0, cosine, 2000) == learning_rate(0, cosine, 500) == learning_rate(0, cosine, 0) == 1e-2
    assert learning_rate(0, TrainConfig(lr=1e-2), 10 ** 6) == 1e-2  # lr_steps 0: the rate at any length
    assert learning_rate(0.9, TrainConfig(lr=1e-2, lr_steps=100, schedule="staged", steps=900), 900) == \
        pytest.approx(1e-2 / 3 * 0.01)
    with pytest.raises(KanimgError):
        TrainConfig(lr_steps=-1)


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_the_trainer_lowers_the_rate_of_a_long_run_by_steps_or_by_the_pace_under_a_budget(monkeypatch, budget):
    """A run of 256 steps with lr_steps 64 trains at half the rate: 256 steps asked for, or a
    clock on which each step takes 1/256 s under a budget of 1 s (the pace carried to the end)."""
    import types

    import kanimg.train as train_module

    clock = iter(range(10 ** 6))  # the trainer's clock alone: each reading 1/256 s after the last, a step between two
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) / 256))
    trainer = small_trainer(steps=256, budget_seconds=budget, lr=1e-2, lr_steps=64, schedule="constant")
    trainer.train()
    assert trainer.step == 256
    assert trainer.history.lr == pytest.approx([5e-3] * len(trainer.history.step))
    unscaled = small_trainer(steps=64, lr=1e-2, lr_steps=64, schedule="constant")
    unscaled.train()
    assert unscaled.history.lr == pytest.approx([1e-2] * len(unscaled.history.step))


def test_grid_updates_every_n_steps_in_the_first_m_of_a_stage():
    cfg = TrainConfig(grid_update_every=10, grid_update_until=1000)
    due = [s for s in range(2000) if grid_update_due(s, cfg)]
    assert due[:3] == [0, 10, 20] and due[-1] == 990 and len(due) == 100
    assert not any(grid_update_due(s, TrainConfig()) for s in range(100))


def test_invalid_configs_are_clear_errors():
    for bad in ({"steps": 0}, {"lr": -1.0}, {"batch_size": -2}, {"schedule": "warmup"}, {"budget_seconds": -1},
                {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}):
        with pytest.raises(KanimgError):
            TrainConfig(**bad)


def small_trainer(**options) -> Trainer:
    torch.manual_seed(0)
    model = build_model("kan", widths=[2, 8, 3], grids=[8, 4])
    pixels = photo_crop(16).astype(np.float32) / 255
    return Trainer(model, ImageTarget(pixels), TrainConfig(**{"batch_size": 64, "eval_every": 0, **options}), progress=False)


def test_staged_schedule_restarts_adam_at_each_stage_and_updates_grids_per_stage():
    trainer = small_trainer(steps=60, schedule="staged", lr=1e-2, grid_update_every=5, grid_update_until=10)
    optimizers, refits = [], []  # keep the objects alive: ids of freed ones get reused
    original = trainer.model.update_grids
    trainer.model.update_grids = lambda x: (refits.append(trainer.step), original(x))
    while trainer.step < 60:
        trainer.config.steps, target = 60, trainer.step + 1
        trainer._before_step()
        if not any(o is trainer.optimizer for o in optimizers):
            optimizers.append(trainer.optimizer)
        trainer.step = target
    assert len(optimizers) == 3
    assert refits == [0, 5, 20, 25, 40, 45]


def test_grid_schedule_extends_grids_and_keeps_training():
    trainer = small_trainer(steps=30, lr=1e-2, grid_schedule=[[10, [16, 8]], [20, [24, 8]]])
    trainer.train()
    assert trainer.model.grids == [24, 8] and trainer.model.spec["grids"] == [24, 8]
    assert trainer.model.layers[0].spline_weight.shape[-1] == 27
    assert np.isfinite(trainer.history.loss).all()


def test_time_budget_stops_training_once_it_is_spent():
    trainer = small_trainer(steps=1, budget_seconds=0.5)  # steps is ignored with a budget
    seen = []
    trainer.train(on_step=lambda t: seen.append(t.train_seconds))
    assert trainer.step > 1 and len(seen) == trainer.step
    assert seen[-1] >= 0.5 and all(s < 0.5 for s in seen[:-1])  # the step that spent the budget was the last
    assert trainer.history.eval_step[-1] == trainer.step  # evaluated at the end


@pytest.mark.parametrize("model_name,lr", [("siren", 1e6), ("mlp", 1e12)])
def test_divergence_is_an_error_even_while_the_loss_stays_finite(model_name, lr):
    torch.manual_seed(0)
    model = build_model(model_name, widths=[2, 32, 3])
    pixels = photo_crop(16).astype(np.float32) / 255
    trainer = Trainer(model, ImageTarget(pixels), TrainConfig(steps=200, lr=lr, batch_size=64, eval_every=0), progress=False)
    with pytest.raises(KanimgError, match="diverged"):
        trainer.train()
    assert trainer.step < 200


def test_a_slow_start_is_not_divergence():
    trainer = small_trainer(steps=40, lr=1e-4)  # barely moves from its initial error: far from diverging
    trainer.train()
    assert trainer.step == 40 and max(trainer.history.loss) <= DIVERGED_MSE


def test_the_time_budget_does_not_pay_for_building_the_kernel(monkeypatch):
    """A fresh machine compiles the KAN kernel in the first forward pass (about a minute): with
    a slow build mocked, a budget shorter than the build still trains many steps."""
    import time

    from kanimg.nn import packed_spline as kan_module

    built = []

    def slow_first_build():
        if not built:
            time.sleep(1.5)
            built.append(True)
        return None  # the PyTorch path

    monkeypatch.setattr(kan_module, "cpu_kernel", slow_first_build)
    trainer = small_trainer(steps=1, budget_seconds=1.0)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.warm_up()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], v) if torch.is_tensor(v) else before[k] == v for k, v in after.items())  # the warm-up changes nothing
    assert all(p.grad is None for p in trainer.model.parameters()) and trainer.sampler.perm is None
    built.clear()  # the build happens inside train() this time
    trainer.train()
    assert trainer.warmup_seconds >= 1.5 and trainer.step > 1  # charged to the budget, the build alone would end it


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(KanimgError, match="precision"):
        TrainConfig(precision="fp8")


def test_compiled_training_matches_eager_and_recompiles_outside_the_clock(monkeypatch):
    """--compile: the same training as eager; the first step and the first after each grid
    extension or knot-kind change compile in a warm-up that the clock does not count."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    options = dict(steps=30, lr=1e-2, grid_update_every=10, grid_update_until=20, grid_schedule=[[15, [16, 8]]])
    eager = small_trainer(**options)
    eager.train()
    compiled = small_trainer(**options, compile=True)
    assert compiled.step_model is not compiled.model
    warm_ups = []
    original = compiled.warm_up
    monkeypatch.setattr(compiled, "warm_up", lambda: warm_ups.append(compiled.step) or original())
    compiled.train()
    # before training; step 0's first grid update (uniform → percentile knots); the extension at step 15
    assert warm_ups == [0, 0, 15]
    assert compiled.model.grids == eager.model.grids == [16, 8]
    assert compiled.evaluate() == pytest.approx(eager.evaluate(), abs=0.01)


@pytest.mark.parametrize("name", ["kan", "mlp"])
def test_bf16_training_runs_under_autocast(name):
    """--precision bf16: the ops autocast lowers run in bfloat16 (an MLP's matmuls), a KAN's spline
    layers stay float32 (kan.py), and the fit stays close to float32's."""
    seen = []

    def fitted(precision: str) -> float:
        torch.manual_seed(0)
        model = build_model(name, widths=[2, 32, 32, 3], **({"grids": [8, 4, 4]} if name == "kan" else {}))
        model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        pixels = photo_crop(16).astype(np.float32) / 255
        trainer = Trainer(model, ImageTarget(pixels), TrainConfig(steps=200, lr=3e-3, batch_size=64, eval_every=0, precision=precision),
                          progress=False)
        trainer.train()
        return trainer.best_psnr

    fp32 = fitted("fp32")
    seen.clear()
    bf16 = fitted("bf16")
    assert set(seen[:-1]) == {torch.float32 if name == "kan" else torch.bfloat16}  # training steps (the last is the float32 evaluation)
    assert seen[-1] == torch.float32
    if name == "kan":
        assert bf16 == fp32  # its layers already are float32 under autocast
    else:
        assert abs(bf16 - fp32) < 1.0 and bf16 > 15  # bfloat16 costs a little, and it still fits
