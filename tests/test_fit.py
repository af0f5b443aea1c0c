"""Fitting end to end: every model on a real crop, the CLI's outputs, resume, and bad input."""
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo_crop
from kanimg.cli import main
from kanimg import fit
from kanimg.io import load_image
from kanimg.metrics import psnr
from kanimg.models import build_model, get_entry
from kanimg.sampling import ImageTarget
from kanimg.train import Trainer, TrainConfig

# (spec, train options, PSNR reached on the 32×32 crop in 300 full-batch steps, measured with
# a margin of a few dB below what it reached)
FITS = {
    "kan": ({"widths": [2, 16, 16, 3], "grids": [16, 8, 8]}, {"lr": 1e-2}, 30.0),
    "siren": ({"widths": [2, 64, 64, 3]}, {"lr": 1e-3}, 40.0),
    "mlp": ({"widths": [2, 64, 64, 3]}, {"lr": 1e-3}, 16.0),
    "rff": ({"widths": [2, 64, 64, 3], "scale": 3.0}, {"lr": 1e-3}, 40.0),
    "hashgrid": ({"widths": [2, 32, 32, 3], "levels": 8, "log2_table_size": 12, "finest_resolution": 32}, {"lr": 1e-2}, 40.0),
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
        result = fit(path, "mlp", widths=[2, 8, {"L": 1, "RGBA": 4}[mode]], steps=5, out=tmp_path / f"run-{mode}", progress=False)
        assert Image.open(result.out / "reconstruction.png").mode == mode


def interrupt_at(step):
    """Make Trainer raise KeyboardInterrupt (as Ctrl-C would) just before ``step``."""
    original = Trainer._before_step

    def before(self):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self)

    return mock.patch.object(Trainer, "_before_step", before)


def test_resume_after_interruption_continues_steps_and_loss(photo32, tmp_path):
    options = dict(model="kan", widths=[2, 8, 8, 3], grids=[8, 4, 4], steps=80, eval_every=20, lr=1e-2, batch_size=256, progress=False)
    straight = fit(photo32, out=tmp_path / "straight", **options)
    with interrupt_at(50):
        stopped = fit(photo32, out=tmp_path / "resumed", **options)
    assert stopped.interrupted and stopped.trainer.step == 50
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = fit(resume=tmp_path / "resumed" / "checkpoint.pt", progress=False)
    assert not resumed.interrupted and resumed.trainer.step == 80 and resumed.out == tmp_path / "resumed"
    a, b = straight.history, resumed.history
    assert b["step"] == a["step"]  # the step count continued, no restart from 0
    # same batches and optimiser state after the resume: the loss curve continues exactly
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    # extending a finished run with more steps
    longer = fit(resume=tmp_path / "resumed" / "checkpoint.pt", steps=100, progress=False)
    assert longer.trainer.step == 100 and json.loads((tmp_path / "resumed" / "metrics.json").read_text())["steps_done"] == 100


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
        "diverging SIREN (finite loss)": ["fit", photo, "--model", "siren", "--widths", "2,32,3", "--lr", "1e6", "--steps", "40"],
        "infinite lr": ["fit", photo, "--lr", "inf"],
        "grid extension too fine": ["fit", photo, "--widths", "2,8,3", "--grids", "8,4", "--grid-schedule", "5:3000000,4", "--steps", "10"],
        "grid extension to zero": ["fit", photo, "--widths", "2,8,3", "--grids", "8,4", "--grid-schedule", "5:0,0", "--steps", "10"],
        "grid extension of the wrong length": ["fit", photo, "--widths", "2,8,3", "--grids", "8,4", "--grid-schedule", "5:16,4,4"],
        "grid extension of a SIREN": ["fit", photo, "--model", "siren", "--grid-schedule", "5:8,4"],
        "model too large": ["fit", photo, "--widths", "2,4096,4096,3", "--grids", "8,4000,8"],
        "the working folder": ["fit", photo, "--steps", "5", "-o", ".", "--force"],
        "missing checkpoint": ["render", tmp_path / "nothing.pt"],
        "bad render size": ["render", tmp_path / "nothing.pt", "--size", "0x10"],
    })
    return cases


def test_bad_input_is_one_line_nonzero_and_leaves_nothing(photo32, tmp_path, capsys):
    (tmp_path / "files").mkdir()
    for kind, argv in bad_invocations(tmp_path, photo32).items():
        out = tmp_path / "out" / kind.replace(" ", "_").replace("/", "_")
        code = run_cli(*argv, *(["-o", out] if "-o" not in argv else []), "-q") if argv[0] == "fit" else run_cli(*argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, kind
        assert err.startswith("kanimg: error:") and "\n" not in err and "Traceback" not in err, (kind, err)
        assert not out.exists(), kind
        leftovers = list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else []
        assert not leftovers, (kind, leftovers)


def test_widths_written_for_grey_get_one_output_per_channel(photo32, tmp_path):
    result = fit(photo32, "kan", widths=[2, 8, 1], grids=[8, 4], steps=5, progress=False)
    assert result.model.spec["widths"] == [2, 8, 3]


def test_ctrl_c_in_a_real_process_saves_a_resumable_run(photo32, tmp_path):
    """SIGINT (Ctrl-C) to the real command: exit 130, outputs and checkpoint written."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "kanimg", "fit", str(photo32), "--model", "mlp", "--widths", "2,32,3",
                             "--steps", "1000000", "-o", str(out), "-q"], stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (cmd &) inherits SIGINT ignored; a terminal's Ctrl-C is not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / ".run.partial").exists() and time.time() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] and 0 < metrics["steps_done"] < 1000000
    assert "--resume" in err and (out / "checkpoint.pt").exists() and (out / "reconstruction.png").exists()
    assert not list(tmp_path.glob(".run.*"))


def small_fit(tmp_path: Path, photo: Path, name: str = "run", steps: int = 20) -> Path:
    out = tmp_path / name
    assert run_cli("fit", photo, "--model", "mlp", "--widths", "2,16,3", "--steps", steps, "-o", out, "-q") == 0
    return out


def test_broken_checkpoints_are_one_line_errors(photo32, tmp_path, capsys):
    good = small_fit(tmp_path, photo32) / "checkpoint.pt"
    payload = torch.load(good, weights_only=True)
    empty = tmp_path / "empty.pt"
    empty.touch()
    torch.save({"format": "kanimg-checkpoint", "version": 1}, tmp_path / "no-config.pt")
    torch.save({**payload, "trainer": {k: v for k, v in payload["trainer"].items() if k != "spec"}}, tmp_path / "no-spec.pt")
    wrong = {**payload, "trainer": {**payload["trainer"], "best_model": {"layers.0.weight": torch.zeros(3, 3)}}}
    torch.save(wrong, tmp_path / "wrong-weights.pt")
    shutil.copy(photo32, tmp_path / "photo.pt")
    (tmp_path / "folder").mkdir()
    for name, message in (("empty.pt", "not a file torch.save wrote"), ("photo.pt", "not a file torch.save wrote"),
                          ("folder", "checkpoint.pt"), ("no-config.pt", "no config"),
                          ("no-spec.pt", "no trainer.spec"), ("wrong-weights.pt", "do not fit")):
        for argv in (["render", tmp_path / name, "-o", tmp_path / "x.png"], ["fit", "--resume", tmp_path / name, "-o", tmp_path / "y", "-q"]):
            assert run_cli(*argv) == 2, (name, argv[0])
            err = capsys.readouterr().err.strip()
            assert err.startswith("kanimg: error:") and "\n" not in err, err
            assert message in err, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y").exists()
    assert run_cli("render", good, "--size", "100000x100000") == 2
    assert "10,000 megapixels, over the limit" in capsys.readouterr().err
    assert run_cli("render", good, "--size", "1048577x1") == 2  # one megapixel, but a side over the limit: says the side
    assert "a side of 1,048,577 pixels, over the limit of 1,048,576" in capsys.readouterr().err
    huge = {**payload["trainer"], "best_spec": {**payload["trainer"]["spec"], "widths": [2, 60_000, 60_000, 3]}}
    torch.save({**payload, "trainer": huge}, tmp_path / "huge.pt")
    with mock.patch("kanimg.checkpoints.build_model", side_effect=AssertionError("built before checking its size")):
        assert run_cli("render", tmp_path / "huge.pt", "-o", tmp_path / "x.png") == 2
    assert "parameters" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert run_cli("render", good.parent, "--size", "8x6") == 0  # a run folder: its checkpoint, the render beside it
    assert (good.parent / "render-8x6.png").is_file()
    staging = tmp_path / ".killed.partial"  # a first run killed: no run folder yet, only its staging folder
    staging.mkdir()
    shutil.copy(good, staging / "checkpoint.pt")
    assert run_cli("render", staging / "checkpoint.pt", "--size", "8x6") == 0 and (staging / "render-8x6.png").is_file()


def test_outputs_that_cannot_be_written_are_refused_before_any_work(photo32, tmp_path, capsys):
    """/proc takes no new files, even for root: every verb says so in one line, before training."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    good = small_fit(tmp_path, photo32) / "checkpoint.pt"
    kimg = tmp_path / "tiny.kimg"
    assert run_cli("compress", photo32, "-o", kimg, "--bpp", "8", "--steps", "20", "--qat-steps", "0", "-q") == 0
    capsys.readouterr()
    never = mock.patch("kanimg.train.Trainer.train", side_effect=AssertionError("trained before checking the output"))
    with never:
        for argv in (["fit", photo32, "-o", "/proc/kanimg-run", "-q"], ["render", good, "-o", "/proc/x.png"],
                     ["compare", photo32, "--models", "mlp", "-o", "/proc/kanimg-cmp", "-q"],
                     ["compress", photo32, "-o", "/proc/x.kimg", "-q"], ["decode", kimg, "-o", "/proc/x.png"],
                     ["rd", photo32, "--models", "kan", "--codecs", "jpeg", "-o", "/proc/kanimg-rd", "-q"]):
            assert run_cli(*argv) == 2, argv[0]
            err = capsys.readouterr().err.strip()
            assert err.startswith("kanimg: error:") and "\n" not in err and "/proc" in err, (argv[0], err)


def test_resume_never_replaces_another_folder_without_force(photo32, tmp_path, capsys):
    run = small_fit(tmp_path, photo32)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_cli("fit", "--resume", run / "checkpoint.pt", "-o", other, "--steps", "30", "-q") == 2
    assert "not a folder kanimg wrote" in capsys.readouterr().err  # not "pass --force": that would not replace it either
    assert run_cli("fit", "--resume", run / "checkpoint.pt", "-o", other, "--steps", "30", "--force", "-q") == 2
    assert "not a folder kanimg wrote" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # its own folder is what a resume updates, keeping what the user put there (a render, notes)
    assert run_cli("render", run / "checkpoint.pt", "--size", "8x8") == 0
    (run / "mine").mkdir()
    (run / "mine" / "notes.txt").write_text("kept")
    assert run_cli("fit", "--resume", run / "checkpoint.pt", "--steps", "30", "-q") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps_done"] == 30 and metrics["resumed_from_step"] == 20
    assert (run / "render-8x8.png").is_file() and (run / "mine" / "notes.txt").read_text() == "kept"
    assert run_cli("fit", photo32, "-o", run, "--model", "mlp", "--widths", "2,8,3", "--steps", "5", "--force", "-q") == 0
    assert json.loads((run / "metrics.json").read_text())["model"]["name"] == "mlp"  # kanimg's own outputs replaced
    assert (run / "render-8x8.png").is_file() and (run / "mine" / "notes.txt").read_text() == "kept"


def test_resume_refuses_settings_it_cannot_change(photo32, tmp_path, capsys):
    run = small_fit(tmp_path, photo32)
    for flags, flag in ((["--lr", "0.5"], "--lr"), (["--model", "kan"], "--model"), (["--widths", "2,8,3"], "--widths"),
                        (["--batch-size", "64"], "--batch-size"), (["--grey"], "--grey"), (["--precision", "bf16"], "--precision")):
        assert run_cli("fit", photo32, "-o", run, "--resume", *flags, "-q") == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"kanimg: error: {flag} ") and "differs" in err, err
    # the same values as the run's, and the ones that may change, are fine
    lr = json.loads((run / "metrics.json").read_text())["config"]["train"]["lr"]
    assert run_cli("fit", photo32, "-o", run, "--resume", "--widths", "2,16,1", "--lr", lr, "--steps", "25",
                   "--eval-every", "5", "--precision", "fp32", "--compile", "-q") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps_done"] == 25 and metrics["config"]["train"]["eval_every"] == 5 and metrics["config"]["train"]["compile"]
    # fewer steps than it has trained: said, not a silent run that trains nothing
    assert run_cli("fit", photo32, "-o", run, "--resume", "--steps", "10", "-q") == 2
    assert "--steps 10 is fewer than the 25 steps" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_a_second_process_on_the_same_output_is_refused(photo32, tmp_path, capsys):
    from kanimg.files import OutputLock

    out = tmp_path / "run"
    with OutputLock(out):  # as a running `kanimg fit -o run` holds it
        assert run_cli("fit", photo32, "--model", "mlp", "--widths", "2,8,3", "--steps", "5", "-o", out, "-q") == 2
    assert "being written by another kanimg process" in capsys.readouterr().err
    assert not out.exists()
    small_fit(tmp_path, photo32)  # free again, and no lock file left behind
    assert not list(tmp_path.glob(".run.*"))


def kill_9_during(script: str, staged: Path) -> int:
    """Run ``script`` in a fresh Python, SIGKILL it once it has written ``staged``, and return the
    step of that checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not staged.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    step = int(torch.load(staged, weights_only=True)["trainer"]["step"])
    assert step > 0
    return step


def test_kill_9_loses_at_most_a_checkpoint_period_and_resume_continues(photo32, tmp_path, capsys):
    out = tmp_path / "run"
    staged = tmp_path / ".run.partial" / "checkpoint.pt"
    step = kill_9_during(f"from kanimg import fit; fit({str(photo32)!r}, 'mlp', widths=[2, 16, 3], "
                         f"steps=10**7, eval_every=50, out={str(out)!r}, progress=False, checkpoint_seconds=0.2)",
                         staged)
    assert not out.exists()
    # a new run does not silently throw the killed one away ...
    assert run_cli("fit", photo32, "--model", "mlp", "--widths", "2,16,3", "-o", out, "-q") == 2
    assert "--resume" in capsys.readouterr().err and staged.exists()
    # ... and --resume without a path continues it
    assert run_cli("fit", photo32, "-o", out, "--resume", "--steps", step + 30, "-q") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == step and metrics["steps_done"] == step + 30
    assert metrics["history"]["step"][0] == 10  # the curves from before the kill are kept
    assert not list(tmp_path.glob(".run.*"))


def test_a_killed_extension_of_a_finished_run_is_not_lost_to_its_older_checkpoint(photo32, tmp_path, capsys):
    run = small_fit(tmp_path, photo32)  # finished at step 20
    staged = tmp_path / ".run.partial" / "checkpoint.pt"
    step = kill_9_during(f"from kanimg import fit; fit(resume={str(run / 'checkpoint.pt')!r}, "
                         f"steps=10**7, progress=False, checkpoint_seconds=0.2)", staged)
    assert step > 20 and json.loads((run / "metrics.json").read_text())["steps_done"] == 20  # the finished run is intact
    assert run_cli("fit", "--resume", run / "checkpoint.pt", "--steps", "25", "-q") == 2  # the older checkpoint, by name
    assert "interrupted run at step" in capsys.readouterr().err and staged.exists()
    assert run_cli("fit", photo32, "-o", run, "--resume", "--steps", step + 10, "-q") == 0
    assert json.loads((run / "metrics.json").read_text())["steps_done"] == step + 10


@pytest.mark.parametrize("name", sorted(FITS))
def test_every_family_round_trips_through_its_checkpoint(name, photo32, tmp_path):
    spec, train, _ = FITS[name]
    run = tmp_path / name
    fit(photo32, name, **spec, **{**train, "steps": 8, "eval_every": 4}, out=run, progress=False)
    assert run_cli("render", run / "checkpoint.pt", "-o", tmp_path / "again.png") == 0
    assert np.array_equal(load_image(tmp_path / "again.png").pixels, load_image(run / "reconstruction.png").pixels)


@pytest.mark.parametrize("name", ["kan", "hashgrid", "siren", "rff", "mlp", "kan-ridge", "kan2"])
def test_a_run_is_told_apart_from_other_settings_by_what_it_recorded(name, photo32, tmp_path):
    """standing decides whether compare and the tuning sweep may reuse, resume or extend a run:
    today's settings match the run's own files (finished or killed, defaults sized to the image),
    more steps extend it, and any other option, default, or fewer steps do not."""
    from kanimg.reruns import saved_config, standing

    options = {"steps": 3, "eval_every": 3, "seed": 1}
    run = tmp_path / name
    fit(photo32, name, **options, out=run, progress=False)
    config = saved_config(run)
    assert config == json.loads((run / "metrics.json").read_text())["config"]
    assert standing(config, name, options) == standing(config, name, {**options, "coords": "centers", "grey": False}) == "same"
    assert standing(config, name, {**options, "eval_every": 1, "compile": None}) == "same"
    assert standing(config, name, {**options, "steps": 30, "eval_every": 10}) == "shorter"  # a resume extends it
    assert standing(config, name, {**options, "steps": 2}) == "other"
    assert standing(config, name, {**options, "seed": 2}) == "other"
    assert standing(config, name, {**options, "coords": "linspace"}) == "other"
    assert standing(config, name, {**options, "grey": True}) == "other"
    assert standing(config, "mlp" if name != "mlp" else "rff", options) == "other"
    entry = get_entry(name)
    with mock.patch.dict(entry.train_defaults, {"lr": entry.train_defaults["lr"] * 2}):
        assert standing(config, name, options) == "other"
    option = "widths" if name != "kan" else "grids"
    changed = [2, 7, 3] if option == "widths" else [5]
    assert standing(config, name, {**options, option: changed}) == "other"
    (run / "checkpoint.pt").unlink()  # the files then say nothing: resuming will say what is wrong
    (run / "metrics.json").write_text("{")
    assert saved_config(run) is None


def test_a_run_folder_is_reused_resumed_extended_or_fitted_anew(photo32, tmp_path):
    """fit_run trains no more than a request needs: nothing for a finished run with its
    settings, a resume for a stopped or shorter one, a new fit for one with other settings."""
    from kanimg import reruns

    options = {"widths": [2, 8, 3], "steps": 6, "eval_every": 3, "seed": 1}
    run, calls = tmp_path / "run", []
    real_fit = reruns.fit

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real_fit(*args, **kwargs)

    with mock.patch("kanimg.reruns.fit", spy):
        assert reruns.fit_run(run, photo32, "mlp", progress=False, **options).metrics["psnr"] > 0
        assert reruns.fit_run(run, photo32, "mlp", progress=False, **options) is None
        reruns.fit_run(run, photo32, "mlp", progress=False, **{**options, "steps": 9})
        longer = json.loads((run / "metrics.json").read_text())
        notes = []
        reruns.fit_run(run, photo32, "mlp", progress=False, note=notes.append, **{**options, "lr": 1e-3})
        other = json.loads((run / "metrics.json").read_text())
    assert calls == [None, True, None]
    assert (longer["steps_done"], longer["resumed_from_step"]) == (9, 6)
    assert (other["steps_done"], other["resumed_from_step"], other["config"]["train"]["lr"]) == (6, None, 1e-3)
    assert "other settings" in notes[0]

    # a finished run whose checkpoint cannot be read is still reused by what metrics.json records
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with mock.patch("kanimg.reruns.fit", side_effect=AssertionError("trained again")):
        assert reruns.fit_run(run, photo32, "mlp", progress=False, **{**options, "lr": 1e-3}) is None

    # grey, the other coordinates and a time budget (where steps do not count) are reused too
    clocked = {"widths": [2, 8, 1], "budget_seconds": 0.2, "eval_every": 5, "grey": True, "coords": "linspace"}
    reruns.fit_run(tmp_path / "clocked", photo32, "mlp", progress=False, **clocked)
    with mock.patch("kanimg.reruns.fit", side_effect=AssertionError("trained again")):
        assert reruns.fit_run(tmp_path / "clocked", photo32, "mlp", progress=False, **clocked, steps=123_456) is None
    config = reruns.saved_config(tmp_path / "clocked")
    assert reruns.standing(config, "mlp", {**clocked, "grey": False}) == reruns.standing(config, "mlp", {**clocked, "coords": None}) \
        == reruns.standing(config, "mlp", {**clocked, "budget_seconds": 0.3}) == "other"

    # the same file name with other pixels is another image: fitted anew
    edited = tmp_path / "edited" / "photo.png"
    edited.parent.mkdir()
    edited.write_bytes(Path(photo32).read_bytes())
    reruns.fit_run(tmp_path / "e", edited, "mlp", progress=False, **options)
    assert reruns.standing(reruns.saved_config(tmp_path / "e"), "mlp", options, image_file=edited) == "same"
    Image.fromarray(255 - np.asarray(Image.open(photo32))).save(edited)
    notes = []
    assert reruns.fit_run(tmp_path / "e", edited, "mlp", progress=False, note=notes.append, **options) is not None
    assert "other settings" in notes[0]


@pytest.mark.parametrize("directions", [0, 8])
def test_a_kan_checkpoint_from_before_new_kan_options_rebuilds_the_kan_it_was(photo32, tmp_path, directions):
    """The default KAN gained ridge directions, then a hash encoding; a checkpoint whose specs
    predate those options is the KAN on coordinates it was trained as (x-y without
    ``directions``, ridge without ``levels``) and must render and resume as one, not as
    today's default."""
    spec, train, _ = FITS["kan"]
    run = tmp_path / "xy"
    fit(photo32, "kan", **{**spec, "directions": directions, "levels": 0}, **{**train, "steps": 8, "eval_every": 4}, out=run,
        progress=False)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["trainer"]["spec"]["directions"] == directions
    later = {"levels", "features", "log2_table_size", "base_resolution", "finest_resolution"} | ({"directions"} if directions == 0 else set())

    def without_directions(spec):
        return {k: v for k, v in spec.items() if k not in later}

    trainer = payload["trainer"]
    old = {**payload, "config": {**payload["config"], "model": without_directions(payload["config"]["model"])},
           "trainer": {**trainer, "spec": without_directions(trainer["spec"]), "best_spec": without_directions(trainer["best_spec"])}}
    torch.save(old, tmp_path / "old.pt")
    assert run_cli("render", tmp_path / "old.pt", "-o", tmp_path / "old.png") == 0
    assert np.array_equal(load_image(tmp_path / "old.png").pixels, load_image(run / "reconstruction.png").pixels)
    assert run_cli("fit", "--resume", tmp_path / "old.pt", "-o", tmp_path / "resumed", "--steps", 12, "-q") == 0
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["model"]
    assert (resumed["directions"], resumed["levels"]) == (directions, 0)


def test_a_checkpoint_from_before_lr_steps_resumes_at_its_rate(photo32, tmp_path, capsys):
    """Runs saved before lr_steps existed trained at their rate at any length: they resume so
    (lr_steps 0), naming it is no error, and naming another value is refused like any setting."""
    run = small_fit(tmp_path, photo32)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    train = {k: v for k, v in payload["config"]["train"].items() if k != "lr_steps"}
    history = {k: v for k, v in payload["trainer"]["history"].items() if k != "lr"}
    torch.save({**payload, "config": {**payload["config"], "train": train}, "trainer": {**payload["trainer"], "history": history}},
               tmp_path / "old.pt")
    assert run_cli("fit", "--resume", tmp_path / "old.pt", "-o", tmp_path / "other", "--lr-steps", "5", "-q") == 2
    assert "--lr-steps" in capsys.readouterr().err
    assert run_cli("fit", "--resume", tmp_path / "old.pt", "-o", tmp_path / "resumed", "--lr-steps", "0", "--steps", "25", "-q") == 0
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["config"]["train"]["lr_steps"] == 0 and metrics["steps_done"] == 25
    lrs = metrics["history"]["lr"]
    assert len(lrs) == len(metrics["history"]["step"]) and lrs[0] is None and lrs[-1] is not None


def test_a_fit_that_names_no_steps_trains_longer_on_a_larger_image(photo32, tmp_path):
    from kanimg.fitting import MAX_DEFAULT_STEPS, steps_for_image, train_config_for

    assert steps_for_image(32, 32) == steps_for_image(256, 256) == 2000
    assert steps_for_image(512, 512) == 4000  # twice the side, twice the steps
    assert steps_for_image(500, 741) == 4800
    assert steps_for_image(20000, 20000) == MAX_DEFAULT_STEPS
    assert train_config_for("kan", {}, (512, 512)).steps == 4000
    assert train_config_for("kan", {"steps": 300}, (512, 512)).steps == 300  # a named count wins
    assert train_config_for("kan", {}).steps == 2000
    # on a GPU the batch the user did not choose grows (it was never busy at CPU batch sizes)
    cuda = torch.device("cuda")
    assert train_config_for("kan", {}, device=cuda).batch_size == 16 * train_config_for("kan", {}).batch_size
    assert train_config_for("kan", {"batch_size": 512}, device=cuda).batch_size == 512
    assert train_config_for("kan", {"batch_size": None}, device=torch.device("cpu")).batch_size == get_entry("kan").train_defaults["batch_size"]
    assert train_config_for("kan-ridge", {}).batch_size == 4096  # a variant's own training defaults
    with mock.patch("kanimg.fitting.steps_for_image", return_value=7) as rule:  # fit asks the rule with the image's size
        result = fit(photo32, "mlp", widths=[2, 8, 3], progress=False)
    rule.assert_called_once_with(32, 32)
    assert result.trainer.step == 7


@pytest.mark.parametrize("name", ["kan", "hashgrid"])
def test_an_image_smaller_than_the_coarsest_hash_level_fits(name):
    """Sized to the image, the finest level may not fall below the coarsest (16 cells): a 9×13
    icon gets that level alone instead of an error about options the user never set."""
    pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    result = fit(pixels, name, steps=3, progress=False)
    assert result.config["model"]["finest_resolution"] == result.config["model"]["base_resolution"] == 16
    assert result.render().shape == (9, 13, 3)


def test_a_checkpoint_of_a_renamed_model_still_renders(photo32, tmp_path):
    """kan-ridge8 became kan, then kan-ridge: its checkpoints are rebuilt under today's name."""
    spec, train, _ = FITS["kan"]
    run = tmp_path / "ridge"
    fit(photo32, "kan", **{**spec, "directions": 8, "levels": 0}, **{**train, "steps": 8, "eval_every": 4}, out=run, progress=False)
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    trainer = payload["trainer"]
    old = {**payload, "config": {**payload["config"], "model": {**payload["config"]["model"], "name": "kan-ridge8"}},
           "trainer": {**trainer, "spec": {**trainer["spec"], "name": "kan-ridge8"}, "best_spec": {**trainer["best_spec"], "name": "kan-ridge8"}}}
    torch.save(old, tmp_path / "old.pt")
    assert run_cli("render", tmp_path / "old.pt", "-o", tmp_path / "old.png") == 0
    assert np.array_equal(load_image(tmp_path / "old.png").pixels, load_image(run / "reconstruction.png").pixels)
