"""Fitting end to end: every model on a real crop, the CLI's outputs, resume, and bad input."""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo_crop
from kanimg.cli import main
from kanimg.fit import fit_image
from kanimg.io import load_image
from kanimg.metrics import psnr
from kanimg.models import build_model
from kanimg.sampling import ImageTarget
from kanimg.train import Trainer, TrainConfig

# (spec, train options, PSNR reached on the 32×32 crop in 300 full-batch steps, measured with
# a margin of a few dB below what it reached)
FITS = {
    "kan": ({"widths": [2, 16, 16, 3], "grids": [16, 8, 8]}, {"lr": 1e-2}, 30.0),
    "siren": ({"widths": [2, 64, 64, 3]}, {"lr": 1e-3}, 40.0),
    "mlp": ({"widths": [2, 64, 64, 3]}, {"lr": 1e-3}, 16.0),
    "rff": ({"widths": [2, 64, 64, 3], "scale": 3.0}, {"lr": 1e-3}, 40.0),
}


@pytest.mark.parametrize("name", sorted(FITS))
def test_each_model_fits_a_real_crop(name):
    spec, train, floor = FITS[name]
    torch.manual_seed(0)
    model = build_model(name, **spec)
    pixels = photo_crop(32).astype(np.float32) / 255
    trainer = Trainer(model, ImageTarget(pixels), TrainConfig(steps=300, batch_size=0, eval_every=100, **train), progress=False)
    trainer.train()
    assert trainer.best_psnr > floor


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_end_to_end_writes_every_output(photo32, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("fit", photo32, "--widths", "2,8,8,3", "--grids", "8,4,4", "--steps", "60", "--eval-every", "20", "-o", out, "-q") == 0
    for name in ("reconstruction.png", "error.png", "curves.png", "metrics.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    original = load_image(photo32).pixels
    written = load_image(out / "reconstruction.png")
    assert written.pixels.shape == (32, 32, 3) and written.bit_depth == 8
    assert metrics["metrics"]["psnr_png"] == pytest.approx(psnr(original, written.pixels), abs=1e-9)
    assert abs(metrics["metrics"]["psnr"] - metrics["metrics"]["psnr_png"]) < 0.5
    for key in ("params", "wall_seconds", "steps_per_second", "device", "versions", "seed", "config"):
        assert metrics[key] is not None, key
    assert metrics["config"]["model"]["widths"] == [2, 8, 8, 3] and metrics["config"]["train"]["steps"] == 60
    assert metrics["metrics"]["lpips"] is None or metrics["metrics"]["lpips"] >= 0
    assert "PSNR" in capsys.readouterr().out
    # refuses to overwrite without --force, then overwrites with it
    assert run_cli("fit", photo32, "--steps", "5", "-o", out, "-q") == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli("fit", photo32, "--model", "mlp", "--widths", "2,8,3", "--steps", "5", "-o", out, "-q", "--force") == 0
    assert json.loads((out / "metrics.json").read_text())["model"]["name"] == "mlp"
    # render at another size from the checkpoint
    big = tmp_path / "big.png"
    assert run_cli("render", out / "checkpoint.pt", "--size", "64x48", "-o", big) == 0
    assert Image.open(big).size == (64, 48)


def test_grey_and_alpha_images_keep_their_channels(tmp_path):
    grey, rgba = tmp_path / "g.png", tmp_path / "a.png"
    Image.fromarray(photo_crop(16, "L")).save(grey)
    Image.fromarray(photo_crop(16, "RGBA")).save(rgba)
    for path, mode in ((grey, "L"), (rgba, "RGBA")):
        result = fit_image(path, model="mlp", spec={"widths": [2, 8, {"L": 1, "RGBA": 4}[mode]]}, train={"steps": 5},
                           out=tmp_path / f"run-{mode}", progress=False)
        assert Image.open(result.out / "reconstruction.png").mode == mode


def interrupt_at(step):
    """Make Trainer raise KeyboardInterrupt (as Ctrl-C would) just before ``step``."""
    original = Trainer._before_step

    def before(self):
        if self.step == step:
            raise KeyboardInterrupt
        original(self)

    return mock.patch.object(Trainer, "_before_step", before)


def test_resume_after_interruption_continues_steps_and_loss(photo32, tmp_path):
    options = dict(model="kan", spec={"widths": [2, 8, 8, 3], "grids": [8, 4, 4]},
                   train={"steps": 80, "eval_every": 20, "lr": 1e-2, "batch_size": 256}, progress=False)
    straight = fit_image(photo32, out=tmp_path / "straight", **options)
    with interrupt_at(50):
        stopped = fit_image(photo32, out=tmp_path / "resumed", **options)
    assert stopped.interrupted and stopped.metrics["steps_done"] == 50
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = fit_image(resume=tmp_path / "resumed" / "checkpoint.pt", progress=False)
    assert not resumed.interrupted and resumed.metrics["steps_done"] == 80
    a, b = straight.metrics["history"], resumed.metrics["history"]
    assert b["step"] == a["step"]  # the step count continued, no restart from 0
    # same batches and optimiser state after the resume: the loss curve continues exactly
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    # extending a finished run with more steps
    longer = fit_image(resume=tmp_path / "resumed" / "checkpoint.pt", train={"steps": 100}, progress=False)
    assert longer.metrics["steps_done"] == 100


def bad_invocations(tmp_path, photo):
    from test_io import bad_files

    files = bad_files(tmp_path / "files")
    cases = {kind: ["fit", path] for kind, (path, _) in files.items()}
    cases.update({
        "unknown model": ["fit", photo, "--model", "transformer"],
        "widths/grids length mismatch": ["fit", photo, "--widths", "2,8,8,3", "--grids", "8,4"],
        "zero width": ["fit", photo, "--widths", "2,0,3"],
        "negative grid": ["fit", photo, "--widths", "2,8,3", "--grids", "8,-2"],
        "non-integer widths": ["fit", photo, "--widths", "2,eight,3"],
        "widths not matching channels": ["fit", photo, "--widths", "2,8,4"],
        "widths not starting with 2": ["fit", photo, "--widths", "3,8,3"],
        "option of another family": ["fit", photo, "--model", "kan", "--omega0", "30"],
        "negative steps": ["fit", photo, "--steps", "-5"],
        "NaN loss": ["fit", photo, "--model", "mlp", "--widths", "2,16,3", "--lr", "1e12", "--steps", "40"],
        "missing checkpoint": ["render", tmp_path / "nothing.pt"],
        "bad render size": ["render", tmp_path / "nothing.pt", "--size", "0x10"],
    })
    return cases


def test_bad_input_is_one_line_nonzero_and_leaves_nothing(photo32, tmp_path, capsys):
    (tmp_path / "files").mkdir()
    for kind, argv in bad_invocations(tmp_path, photo32).items():
        out = tmp_path / "out" / kind.replace(" ", "_").replace("/", "_")
        code = run_cli(*argv, "-o", out, "-q") if argv[0] == "fit" else run_cli(*argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, kind
        assert err.startswith("kanimg: error:") and "\n" not in err and "Traceback" not in err, (kind, err)
        assert not out.exists(), kind
        leftovers = list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else []
        assert not leftovers, (kind, leftovers)


def test_widths_written_for_grey_get_one_output_per_channel(photo32, tmp_path):
    result = fit_image(photo32, model="kan", spec={"widths": [2, 8, 1], "grids": [8, 4]}, train={"steps": 5},
                       out=tmp_path / "run", progress=False)
    assert result.metrics["model"]["widths"] == [2, 8, 3]


def test_ctrl_c_in_a_real_process_saves_a_resumable_run(photo32, tmp_path):
    """SIGINT (Ctrl-C) to the real command: exit 130, outputs and checkpoint written."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kanimg", "fit", str(photo32), "--model", "mlp", "--widths", "2,32,3",
                             "--steps", "1000000", "-o", str(out), "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".run.partial-*")) and time.time() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] and 0 < metrics["steps_done"] < 1000000
    assert "--resume" in err and (out / "checkpoint.pt").exists() and (out / "reconstruction.png").exists()
    assert not list(tmp_path.glob(".run.*"))
