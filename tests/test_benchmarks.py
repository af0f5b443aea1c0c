"""The benchmark scripts run and report every variant (their figures are not asserted: timing
targets are measured by the scripts, not by unit tests)."""
import importlib.util
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import kanimg.models
import kanimg.train
from kanimg.checkpoints import load_checkpoint, save_checkpoint
from kanimg.models import get_entry

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kan_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load("bench_kan").main(["--widths", "2,8,8,1", "--grids", "6,4,4", "--mlp-width", "8", "--batch", "256",
                                   "--rounds", "1", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"fast", "fast-torch", "fast-compile", "torch-compile", "percentile", "reference", "mlp", "floor"}
    assert rows["fast"]["saved_bytes_per_sample"] == rows["fast-torch"]["saved_bytes_per_sample"] == rows["fast-compile"]["saved_bytes_per_sample"]
    assert rows["torch-compile"]["saved_bytes_per_sample"] is not None
    assert rows["percentile"]["saved_bytes_per_sample"] == rows["fast"]["saved_bytes_per_sample"]
    # the fast layer saves only its inputs: 4 bytes per input feature per sample (+ MSE's 2 × 4)
    assert rows["fast"]["saved_bytes_per_sample"] == 4 * (2 + 8 + 8) + 8
    assert rows["reference"]["saved_bytes_per_sample"] > 5 * rows["fast"]["saved_bytes_per_sample"]
    assert "x floor" in capsys.readouterr().out


def test_bench_hashgrid_times_both_paths_of_both_families(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load("bench_hashgrid").main(["--size", "40x60", "--steps", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = {r["family"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"kan", "hashgrid"}
    for row in rows.values():
        assert row["fused_ms_per_step"] > 0 and row["torch_ms_per_step"] > 0 and row["finest_resolution"] == 60
        assert row["log2_table_size"] == 16  # 2,400 pixels (×4 for the hash grid): the smallest default table
    from kanimg.models import get_entry

    for family, row in rows.items():  # each at its own default batch
        assert row["batch_size"] == get_entry(family).train_defaults["batch_size"]
    assert "encoding as PyTorch ops" in capsys.readouterr().out


def test_paper_table_puts_measured_next_to_paper(tmp_path, capsys):
    run = tmp_path / "run"
    for model, psnr, steps, interrupted in (("siren1", 30.0, 15000, False), ("kan2", 44.0, 3500, True)):
        folder = run / "runs" / "cameraman" / model
        folder.mkdir(parents=True)
        metrics = {"model": {"name": model}, "params": 766080, "train_seconds": 1000.0,
                   "metrics": {"psnr": psnr, "psnr_png": psnr, "ssim": 0.9, "lpips": None},
                   "steps_done": steps, "interrupted": interrupted, "steps_per_second": 15.0, "device": "cpu",
                   "history": {"eval_step": [steps], "eval_psnr": [psnr], "eval_seconds": [1000.0]}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "compare-request.json").write_text(json.dumps({"train": {"steps": 15000}, "protocol": {"kind": "preset"}}))
    assert load("paper_table").main([str(run), "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert out.index("| kan2 |") < out.index("| siren1 |")  # the paper's order
    assert "| kan2 | 766,080 | 45.76 | 44.00 | -1.76 | 1809 | 1000 | 3,500 (unfinished) |" in out
    assert "| siren1 | 766,080 | 27.34 | 30.00 | +2.66 | 254 | 1000 | 15,000 |" in out


def test_bench_codec_measures_the_stored_form_before_finetuning():
    """'Before fine-tuning' is the PSNR of the quantised stored network (spline scales folded
    into the coefficients, as the file holds them), so without fine-tuning it is the decoded
    file's PSNR (up to 8-bit output rounding)."""
    import numpy as np
    import torch

    from kanimg.io import ImageData
    from kanimg.models import build_model
    from kanimg.sampling import ImageTarget
    from kanimg.train import Trainer, TrainConfig

    y, x = np.mgrid[0:24, 0:24] / 24
    pixels = np.stack([np.sin(6 * x), np.cos(5 * y), x * y], axis=-1) * 0.4 + 0.5
    image = ImageData(pixels=pixels.astype(np.float32), mode="RGB", bit_depth=8, name="tiny")

    torch.manual_seed(0)
    model = build_model("kan", widths=[2, 6, 4, 3], grids=[8, 4, 4], directions=0, levels=0)
    Trainer(model, ImageTarget(image.pixels), TrainConfig(steps=100, lr=2e-2), progress=False).train()
    with torch.no_grad():  # same function, scales far from 1: folding changes what is quantised
        for layer in model.layers:
            r = torch.empty_like(layer.spline_scale).uniform_(0.2, 5.0)
            layer.spline_scale.mul_(r)
            layer.spline_weight.div_(r[..., None])
    coded = load("bench_codec").code_network(model, image, bits=4, qat_steps=0)
    assert abs(coded["psnr"] - coded["psnr_before_finetuning"]) < 0.05
    assert coded["bpp"] == 8 * coded["bytes"] / (24 * 24)


def test_inr_bench_runs_every_budget_and_seed_and_summarises(tmp_path, monkeypatch, capsys):
    bench = load("inr_bench")
    monkeypatch.setattr(bench, "EVAL", {"camera": "camera", "astronaut": "bundled"})
    monkeypatch.setattr(bench, "CROP", 24)
    out = tmp_path / "bench"
    assert bench.main(["--budgets", "0.2,0.4", "--seeds", "0,1", "--models", "mlp,hashgrid", "--no-full", "-o", str(out),
                       "--json", str(tmp_path / "bench.json"), "-q"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert len(result["records"]) == 2 * 2 * 2 * 2  # budgets × seeds × images × models
    crops = result["summary"]["crops"]
    assert set(crops) == {"0.2", "0.4"} and set(crops["0.2"]) == {"mlp", "hashgrid"}
    row = crops["0.4"]["hashgrid"]
    assert len(row["seed_means"]) == 2 and set(row["per_image"]) == {"camera", "astronaut"}
    assert row["mean"] == sum(row["seed_means"]) / 2
    assert {r["seed"] for r in result["records"]} == {0, 1}
    assert (out / "psnr-vs-budget.png").stat().st_size > 0
    assert "| hashgrid |" in capsys.readouterr().out

    # budgets run at different times, summarised together without training again
    for budget in (0.2, 0.4):
        records = [r for r in result["records"] if r["budget"] == budget]
        (tmp_path / f"{budget}.json").write_text(json.dumps({"records": records}))
    with mock.patch.object(bench, "compare", side_effect=AssertionError("trained")):
        assert bench.main(["--from-json", str(tmp_path / "0.2.json"), str(tmp_path / "0.4.json"), "-o", str(tmp_path / "merged"),
                           "--json", str(tmp_path / "merged.json"), "-q"]) == 0
    assert json.loads((tmp_path / "merged.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "merged" / "psnr-vs-budget.png").stat().st_size > 0
    # … and only the models asked for (a result file also holds earlier defaults under other names)
    assert bench.main(["--from-json", str(tmp_path / "0.2.json"), "--models", "mlp", "-o", str(tmp_path / "mlp"),
                       "--json", str(tmp_path / "mlp.json"), "-q"]) == 0
    assert set(json.loads((tmp_path / "mlp.json").read_text())["summary"]["crops"]["0.2"]) == {"mlp"}


def test_inr_bench_in_parts_by_photo_merges_into_the_whole(tmp_path, monkeypatch, capsys):
    """A benchmark too long for one sitting: each part trains its photos; the whole reuses them."""
    bench = load("inr_bench")
    monkeypatch.setattr(bench, "EVAL", {"camera": "camera", "astronaut": "bundled", "coins": "coins"})
    monkeypatch.setattr(bench, "CROP", 24)
    out, common = tmp_path / "bench", ["--budgets", "0.2", "--seeds", "1", "--models", "mlp", "--no-full", "-q"]
    for part, photos in enumerate(("camera", "astronaut,coins")):
        assert bench.main([*common, "--photos", photos, "-o", str(out), "--json", str(tmp_path / f"part{part}.json")]) == 0
    parts = [json.loads((tmp_path / f"part{part}.json").read_text()) for part in range(2)]
    assert [sorted(r["image"] for r in p["records"]) for p in parts] == [["camera"], ["astronaut", "coins"]]
    assert bench.main([*common, "--photos", "moon", "-o", str(out), "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown photo moon" in capsys.readouterr().err

    with mock.patch("kanimg.reruns.fit", side_effect=AssertionError("trained again")):
        assert bench.main([*common, "-o", str(out), "--json", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert sorted(r["image"] for r in whole["records"]) == ["astronaut", "camera", "coins"]
    assert bench.main(["--from-json", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"), "--models", "mlp", "-q",
                       "-o", str(tmp_path / "merged"), "--json", str(tmp_path / "merged.json")]) == 0
    assert json.loads((tmp_path / "merged.json").read_text())["summary"] == whole["summary"]


def test_inr_bench_tuning_sweep_tries_every_candidate(tmp_path, monkeypatch):
    bench = load("inr_bench")
    monkeypatch.setattr(bench, "TUNE", {"coffee": "coffee"})
    monkeypatch.setattr(bench, "CROP", 24)
    monkeypatch.setattr(bench, "CANDIDATES", {"mlp": [({}, {}), ({}, {"lr": 3e-3})], "rff": [({}, {}), ({"scale": 5.0}, {})]})
    assert bench.main(["--tune", "--budgets", "0.2", "--models", "mlp,rff", "-o", str(tmp_path / "tune"),
                       "--json", str(tmp_path / "tune.json"), "-q"]) == 0
    result = json.loads((tmp_path / "tune.json").read_text())
    assert sorted(result["summary"]["tune"]["0.2"]) == ["mlp#0", "mlp#1", "rff#0", "rff#1"]
    assert {r["train"].get("lr") for r in result["records"] if r["family"] == "mlp"} == {None, 3e-3}

    # run again: finished runs are reused, a candidate whose settings changed under its label is
    # fitted anew, and a run killed mid-way (only its staging folder's checkpoint) is resumed
    runs = tmp_path / "tune" / "runs" / "0.2s" / "coffee"
    older = json.loads((runs / "mlp-0" / "metrics.json").read_text())
    del older["config"]["train"]["lr_steps"]  # written before the option existed: it had its default then
    (runs / "mlp-0" / "metrics.json").write_text(json.dumps(older))
    state = load_checkpoint(runs / "mlp-0" / "checkpoint.pt")  # what the run's decision reads first
    del state["config"]["train"]["lr_steps"]
    save_checkpoint(runs / "mlp-0" / "checkpoint.pt", state)
    reused = (runs / "mlp-0" / "metrics.json").read_bytes()
    killed = runs / "rff-1"
    staging = killed.parent / f".{killed.name}.partial"
    staging.mkdir()
    (killed / "checkpoint.pt").rename(staging / "checkpoint.pt")
    shutil.rmtree(killed)
    monkeypatch.setitem(bench.CANDIDATES, "mlp", [({}, {}), ({}, {"lr": 1e-2})])
    assert bench.main(["--tune", "--budgets", "0.2", "--models", "mlp,rff", "-o", str(tmp_path / "tune"),
                       "--json", str(tmp_path / "again.json"), "-q"]) == 0
    assert (runs / "mlp-0" / "metrics.json").read_bytes() == reused
    assert json.loads((runs / "mlp-1" / "metrics.json").read_text())["config"]["train"]["lr"] == 1e-2
    assert json.loads((killed / "metrics.json").read_text())["config"]["model"]["scale"] == 5.0 and not staging.exists()
    again = json.loads((tmp_path / "again.json").read_text())
    assert sorted(again["summary"]["tune"]["0.2"]) == ["mlp#0", "mlp#1", "rff#0", "rff#1"]

    # a candidate that leaves an option to its family's default, after that default changed: fitted anew
    half = get_entry("mlp").train_defaults["lr"] / 2
    with mock.patch.dict(get_entry("mlp").train_defaults, {"lr": half}):
        assert bench.main(["--tune", "--budgets", "0.2", "--models", "mlp", "--candidates", "mlp#0", "-o", str(tmp_path / "tune"),
                           "--json", str(tmp_path / "later.json"), "-q"]) == 0
    assert json.loads((runs / "mlp-0" / "metrics.json").read_text())["config"]["train"]["lr"] == half

    # Ctrl-C stops the sweep (fit returns what it reached; the sweep does not go on to the next run)
    original = kanimg.train.Trainer._before_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    with mock.patch.object(kanimg.train.Trainer, "_before_step", interrupted), pytest.raises(KeyboardInterrupt):
        bench.main(["--tune", "--budgets", "60", "--models", "mlp,rff", "-o", str(tmp_path / "stopped"), "-q"])
    [stopped] = [json.loads(p.read_text()) for p in (tmp_path / "stopped" / "runs").rglob("metrics.json")]
    assert stopped["interrupted"] and stopped["steps_done"] == 3

    # a later round runs only the candidates it names
    assert bench.main(["--tune", "--budgets", "0.2", "--models", "mlp,rff", "--candidates", "rff#1", "-o", str(tmp_path / "round"),
                       "--json", str(tmp_path / "round.json"), "-q"]) == 0
    assert list(json.loads((tmp_path / "round.json").read_text())["summary"]["tune"]["0.2"]) == ["rff#1"]


def test_inr_bench_refuses_bad_arguments_and_results_in_one_line(tmp_path, capsys):
    bench = load("inr_bench")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"records": [{"set": "crops", "budget": 0.2, "model": "mlp", "image": "camera", "seed": 0,
                                             "psnr": 20.0, "steps": 5}]}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "tune.json").write_text(json.dumps({"records": [{"candidate": "mlp#0", "budget": 0.2}]}))
    out = ["-o", str(tmp_path / "out"), "-q"]
    cases = {
        ("--budgets", "0"): "--budgets takes training seconds above 0",
        ("--budgets", "30,,120"): "--budgets takes training seconds above 0",
        ("--budgets", "nan"): "--budgets takes training seconds above 0",
        ("--seeds", "x"): "--seeds takes seeds from 0",
        ("--tune", "--lr-round="): "--lr-round takes fractions of the rate",
        ("--lr-round", "0.5"): "give them with --tune",
        ("--candidates", "kan#1"): "give them with --tune",
        ("--models", "kan-lr0", "--no-full"): "kan-lr0: a family's rate scaled by 0 cannot train",
        ("--models", "nosuch-lr0.5", "--no-full"): "unknown model 'nosuch'",
        ("--from-json", str(tmp_path / "missing.json")): "missing.json: no such file",
        ("--from-json", str(tmp_path / "broken.json")): "not a results file of this benchmark",
        ("--from-json", str(tmp_path / "tune.json")): "not a results file of this benchmark",
        ("--from-json", str(good), "--models", "kan"): "no record of kan in",
        ("--from-json", str(good), "--json", str(good)): "is one of the results read by --from-json",
    }
    for args, message in cases.items():
        assert bench.main([*args, *out]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "out").exists() and json.loads(good.read_text())["records"][0]["psnr"] == 20.0


def test_inr_bench_lr_round_scales_each_winners_rate(tmp_path, monkeypatch, capsys):
    """A longer budget's round starts from the registry's defaults (the sweep's winners) and
    only scales their rate; the benchmark runs a family at a scaled rate by name."""
    bench = load("inr_bench")
    for family, candidates in bench.lr_round().items():
        entry = get_entry(family)
        assert list(candidates) == [f"{family}-lr1", f"{family}-lr0.5", f"{family}-lr0.25"]
        spec, train = candidates[f"{family}-lr1"]
        assert {k: train[k] for k in ("lr", "batch_size")} == {k: entry.train_defaults[k] for k in ("lr", "batch_size")}
        defaults = entry.default_spec()
        assert {k: v for k, v in spec.items() if defaults[k] is not None} == {k: defaults[k] for k in spec if defaults[k] is not None}
        assert [c[1]["lr"] / train["lr"] for c in candidates.values()] == list(bench.LR_SCALES)
        assert all(c[0] == spec for c in candidates.values())

    monkeypatch.setattr(bench, "TUNE", {"coffee": "coffee"})
    monkeypatch.setattr(bench, "CROP", 24)
    assert bench.main(["--tune", "--lr-round", "--budgets", "0.2", "--models", "rff", "-o", str(tmp_path / "lr"),
                       "--json", str(tmp_path / "lr.json"), "-q"]) == 0
    result = json.loads((tmp_path / "lr.json").read_text())
    assert sorted(result["summary"]["tune"]["0.2"]) == ["rff-lr0.25", "rff-lr0.5", "rff-lr1"]
    assert sorted(r["train"]["lr"] for r in result["records"]) == sorted(1e-3 * s for s in bench.LR_SCALES)
    # a candidate's rate holds at any length (rff's default would lower it past 11,000 steps)
    trained = [json.loads(p.read_text())["config"]["train"] for p in (tmp_path / "lr" / "runs").rglob("metrics.json")]
    assert len(trained) == 3 and {t["lr_steps"] for t in trained} == {0}
    assert set(result["candidates"]) == set(bench.lr_round())
    # a longer budget's round goes below: other fractions, the same family's runs beside the first round's
    assert bench.main(["--tune", "--lr-round", "0.125", "--budgets", "0.2", "--models", "rff", "-o", str(tmp_path / "lr"),
                       "--json", str(tmp_path / "lr8.json"), "-q"]) == 0
    result = json.loads((tmp_path / "lr8.json").read_text())
    assert [(r["candidate"], r["train"]["lr"]) for r in result["records"]] == [("rff-lr0.125", 1e-3 * 0.125)]
    assert len(list((tmp_path / "lr" / "runs").rglob("metrics.json"))) == 4
    for bad in ("0", "-0.5", "half", "0.5,"):
        assert bench.main(["--tune", "--lr-round", bad, "--budgets", "0.2", "--models", "rff", "-o", str(tmp_path / "z"), "-q"]) == 2
        assert "--lr-round takes fractions of the rate" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert bench.main(["--tune", "--lr-round", "--budgets", "0.2", "--models", "kan-ridge", "-o", str(tmp_path / "x"), "-q"]) == 2
    assert "no candidates for kan-ridge" in capsys.readouterr().err
    assert bench.main(["--budgets", "0.2", "--models", "kan,nosuch", "--no-full", "-o", str(tmp_path / "y"), "-q"]) == 2
    assert "unknown model nosuch" in capsys.readouterr().err and not (tmp_path / "y").exists()

    monkeypatch.setattr(bench, "EVAL", {"camera": "camera"})
    monkeypatch.setattr(kanimg.models, "_REGISTRY", dict(kanimg.models._REGISTRY))  # rff-lr0.5 stays this test's
    assert bench.main(["--budgets", "0.2", "--seeds", "0", "--models", "rff,rff-lr0.5", "--no-full", "-o", str(tmp_path / "b"),
                       "--json", str(tmp_path / "b.json"), "-q"]) == 0
    records = {r["model"]: r for r in json.loads((tmp_path / "b.json").read_text())["records"]}
    trained = {name: json.loads((tmp_path / "b" / "crops" / "0.2s-seed0" / r["run"] / "metrics.json").read_text())["config"]["train"]
               for name, r in records.items()}
    assert {name: (t["lr"], t["lr_steps"]) for name, t in trained.items()} == {"rff": (1e-3, 11000), "rff-lr0.5": (5e-4, 0)}
    assert records["rff-lr0.5"]["family"] == "rff"


def test_kan_heads_trains_every_readout_of_the_same_encoding(tmp_path, monkeypatch, capsys):
    import sys

    heads = load("kan_heads")
    monkeypatch.setattr(sys.modules["inr_bench"], "CROP", 24)
    assert heads.main(["--steps", "4", "--photos", "coffee", "-o", str(tmp_path / "heads"), "--json", str(tmp_path / "heads.json")]) == 0
    records = {r["head"]: r for r in json.loads((tmp_path / "heads.json").read_text())["records"]}
    assert list(records) == list(heads.HEADS)
    linear, mlp, kan = records["linear"], records["ReLU MLP [64, 64] (hashgrid@2-hidden)"], records["one KAN layer, no grid updates (kan)"]
    # one encoding (16 levels × 2 features), three readouts: 32·3 + 3, the MLP's, 3 KAN edges per feature
    assert mlp["params"] - linear["params"] == (32 * 64 + 64) + (64 * 64 + 64) + (64 * 3 + 3) - (32 * 3 + 3)
    assert kan["params"] > linear["params"]
    assert "| one KAN layer, no grid updates (kan) |" in capsys.readouterr().out


def test_latent_synthesis_scores_every_synthesis_the_codecs_way(tmp_path, monkeypatch, capsys):
    import sys

    import torch
    from kanimg.compress.latent import LatentImage

    bench = load("latent_synthesis")
    # the harness (pixels-first, by name) computes what the codec's own model does with the same MLP
    torch.manual_seed(0)
    from kanimg.nn.mlp import relu_mlp

    ours = bench.SynthesisUnderTest(9, 14, relu_mlp([7, 48, 3]))
    codec = LatentImage(9, 14, [7, 48, 3])
    for p in ours.latents:
        p.data.normal_(0, 3)
    codec.load_state_dict(ours.state_dict())
    assert torch.allclose(ours("round", ours.quantized_synthesis(7))[0], codec("round", codec.quantized_synthesis(7))[0], atol=1e-5)
    # a KAN's spline scales are folded and frozen (not stored, not trained)
    kan = bench.SYNTHESES["KAN 7 → 6 → C, grid 5"][0](9, 14, 3)
    assert sum(p.numel() for p in kan.synthesis_parameters()) == (7 * 6 + 6 * 3) * (5 + 3 + 1)

    monkeypatch.setattr(sys.modules["inr_bench"], "CROP", 24)
    assert bench.main(["--steps", "4", "--photos", "coffee", "-o", str(tmp_path / "syn"), "--json", str(tmp_path / "syn.json")]) == 0
    records = {r["synthesis"]: r for r in json.loads((tmp_path / "syn.json").read_text())["records"]}
    assert list(records) == list(bench.SYNTHESES)
    assert records["ReLU MLP 7 → 48 → C (the codec's)"]["params"] == 7 * 48 + 48 + 48 * 3 + 3
    assert all(r["bpp"] > 0 and np.isfinite(r["psnr"]) for r in records.values())
    assert "| KAN 7 → 6 → C, grid 5 | 540 |" in capsys.readouterr().out


def test_latent_synthesis_runs_on_any_image_with_the_mlp_beside_the_chosen_syntheses(tmp_path):
    from PIL import Image

    bench = load("latent_synthesis")
    photo = tmp_path / "grey.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.convert("L").resize((20, 16), Image.LANCZOS).save(photo)
    out = tmp_path / "syn.json"
    assert bench.main(["--steps", "3", "--images", str(photo), "--only", "HAT", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["synthesis"] for r in records] == ["ReLU MLP 7 → 48 → C (the codec's)", "hat KAN 7 → 16 → C, grid 4, linear term",
                                                 "hat KAN 7 → 13 → C, grid 2, linear term"]
    assert {r["image"] for r in records} == {"grey"} and records[0]["params"] == 7 * 48 + 48 + 48 + 1  # one channel
    for argv in (["--only", "no such synthesis"], ["--images", str(tmp_path / "missing.png")]):
        with pytest.raises(SystemExit):
            bench.main(argv + ["--json", str(out)])


def test_codec_point_scores_one_file_against_webp_and_avif_with_an_override(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from kanimg.compress import latent_codec
    from kanimg.compress.codecs import get_codec, run_sweep
    from kanimg.compress.rd import psnr_at

    point = load("codec_point")
    photo = tmp_path / "photo.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((48, 48), Image.LANCZOS).save(photo)
    monkeypatch.setattr(latent_codec, "WEIGHT_BITS", latent_codec.WEIGHT_BITS)  # restored after the --set below
    out = tmp_path / "point.json"
    assert point.main([str(photo), "2.0", "--steps", "30", "--set", "latent_codec.WEIGHT_BITS=(9,)", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["result"]["extra"]["synthesis_bits"] == 9 and record["overrides"] == {"latent_codec.WEIGHT_BITS": "(9,)"}
    from kanimg.io import load_image

    image = load_image(photo)
    for name in ("webp", "avif"):
        reference = psnr_at(run_sweep(get_codec(name), image, [record["bpp"] * 1.5]), record["bpp"])
        expected = None if reference is None else round(record["psnr"] - reference, 3)
        assert record[f"minus_{name}"] == expected
    printed = capsys.readouterr().out
    assert f"{record['psnr']:.2f} dB (9 bits)" in printed
    assert "  step    15: λ" in printed  # the rate control's trace: the precision chosen half-way through 30 steps
    assert [entry["step"] for entry in record["result"]["extra"]["history"]] == [15]


def test_colour_error_splits_each_files_error_into_luma_and_chroma(tmp_path, capsys):
    from PIL import Image

    from kanimg.compress.neural import CompressConfig, compress_image
    from kanimg.io import load_image

    bench = load("colour_error")
    # the split against an independent one: an orthonormal basis whose first axis is grey
    rng = np.random.default_rng(0)
    original, decoded = rng.random((5, 7, 3)), rng.random((5, 7, 3))
    basis = np.array([[1, 1, 1] / np.sqrt(3), [1, -1, 0] / np.sqrt(2), [1, 1, -2] / np.sqrt(6)])
    rotated = (decoded - original).reshape(-1, 3) @ basis.T
    luma, chroma = bench.split_error(decoded, original)
    assert np.isclose(luma, np.mean(rotated[:, 0] ** 2) / 3) and np.isclose(chroma, np.mean(rotated[:, 1:] ** 2) * 2 / 3)
    assert np.isclose(luma + chroma, np.mean((decoded - original) ** 2))
    assert bench.split_error(original + 0.1, original)[1] < 1e-12  # a grey shift has no chroma error

    # end to end on an rd folder's layout: one latent file of a colour photo
    photo = tmp_path / "photo.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((32, 32), Image.LANCZOS).save(photo)
    folder = tmp_path / "rd"
    (folder / "kimg").mkdir(parents=True)
    image = load_image(photo)
    data = compress_image(image, 2.0, CompressConfig(model="latent", steps=20)).data
    (folder / "kimg" / "photo-latent-2.0bpp.kimg").write_bytes(data)
    (folder / "results.json").write_text(json.dumps({"images": [{"name": "photo", "path": str(photo), "channels": 3}]}))
    out = tmp_path / "colour.json"
    assert bench.main([str(folder), "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["codecs"]["latent"]["bpp"] == 8 * len(data) / (32 * 32)
    assert set(record["codecs"]) == {"latent", "webp", "avif"}
    assert all(v["luma"] > 0 and v["chroma"] > 0 for v in record["codecs"].values())
    assert "| photo-latent-2.0bpp.kimg |" in capsys.readouterr().out


def test_loss_spikes_counts_jumps_over_the_lowest_loss_in_real_runs(tmp_path, capsys):
    import kanimg

    bench = load("loss_spikes")
    steps = list(range(10, 1010, 10))
    losses = [1e-2 / s for s in steps]  # a smooth descent: no spike however steep
    assert bench.spikes(steps, losses) == []
    losses[60] = 2000 * min(losses[:60])  # step 610: twice the factor over the lowest before it
    losses[61] = 999 * min(losses[:60])  # just under the factor
    losses[10] = 1e9  # step 110: inside the first descent, not counted
    assert bench.spikes(steps, losses) == [(610, losses[60])]

    # a real run's metrics.json, its curve then edited to hold one spike
    run = tmp_path / "runs" / "photo" / "mlp"
    kanimg.fit(ROOT / "assets" / "astronaut.png", "mlp", steps=40, out=run, progress=False, eval_every=20, grey=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert bench.run_record(run / "metrics.json")["spikes"] == 0
    history = metrics["history"]
    history["step"] = steps
    history["loss"] = losses
    (run / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "spikes.json"
    assert bench.main([str(tmp_path / "runs"), "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert (record["model"], record["image"], record["spikes"], record["first_spike_step"]) == ("mlp", "astronaut", 1, 610)
    assert record["best_eval_psnr"] == max(history["eval_psnr"])
    # the run's evaluations (steps 20 and 40) all come before the spike at step 610
    assert record["best_eval_before_worst"] == max(history["eval_psnr"]) and record["lowest_eval_after_worst"] is None
    assert "| ↳ astronaut, seed 0 |" in capsys.readouterr().out
    assert bench.main([str(tmp_path / "nothing")]) == 2
    # a damaged or foreign metrics.json: one line naming it, no traceback
    capsys.readouterr()
    for damaged in (b'{"history": {"step": [1', b"\xff\xfe", b"[]"):
        (run / "metrics.json").write_bytes(damaged)
        assert bench.main([str(tmp_path / "runs"), "--json", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "metrics.json is not a kanimg run's metrics.json" in error


def test_bd_between_compares_two_network_codecs_from_separate_rd_runs(tmp_path, capsys):
    """A test curve 0.5 dB below the reference at every rate: BD-PSNR −0.5 dB and more bits for
    the same PSNR, per image and on the mean curve; an image the reference lacks is refused."""
    bench = load("bd_between")
    rates = [0.1, 0.2, 0.3, 0.5]

    def rd_folder(name, codec, images, shift):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"image": image, "codec": codec, "bpp": bpp * (1 + 0.1 * k), "psnr": 20 + k + 8 * np.log2(bpp) + shift,
                    "bytes": 0, "setting": f"target {bpp} bpp", "encode_seconds": 1.0, "decode_seconds": 0.1}
                   for image in images for k in ["abc".index(image)] for bpp in rates]
        records.append({"image": images[0], "codec": "webp", "bpp": 0.3, "psnr": 99.0})  # another codec: ignored (no Point fields)
        (folder / "results.json").write_text(json.dumps({"records": records}))
        return str(folder)

    reference = rd_folder("ref", "latent", ["a", "b"], 0.0)
    test_a, test_b = rd_folder("test-a", "latent-kan", ["a"], -0.5), rd_folder("test-b", "latent-kan", ["b"], -0.5)
    out = tmp_path / "bd.json"
    assert bench.main(["--reference", "latent", reference, "--test", "latent-kan", test_a, test_b, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"a", "b", "mean curve"}
    for row in results.values():
        assert row["bd_psnr_db"] == pytest.approx(-0.5, abs=1e-6)
        assert row["bd_rate_percent"] == pytest.approx(100 * (2 ** (0.5 / 8) - 1), abs=1e-3)  # 8 dB per doubling
    assert "| mean curve | +4.4 % | -0.50 dB |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no points for c"):
        bench.main(["--reference", "latent", reference, "--test", "latent-kan", rd_folder("test-c", "latent-kan", ["c"], 0.0),
                    "--json", str(out)])


def test_latent_train_speed_times_each_codecs_steps_per_image_and_refuses_bad_arguments(tmp_path, capsys):
    from PIL import Image

    bench = load("latent_train_speed")
    photo = tmp_path / "small.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.resize((24, 20), Image.LANCZOS).save(photo)
    out = tmp_path / "speed.json"
    assert bench.main([str(photo), "--steps", "3", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["size"], r["channels"], r["steps"], len(r["seconds"])) for r in rows] == \
        [("latent", "24x20", 3, 3, 2), ("latent-kan", "24x20", 3, 3, 2)]
    assert all(r["ms_per_step"] > 0 and r["encode_seconds_at_default_steps"] > 0 for r in rows)
    assert "| small.png | 24x20 | latent-kan |" in capsys.readouterr().out
    assert bench.main([str(photo), "--models", "latent,siren", "--json", str(out)]) == 2
    assert bench.main([str(tmp_path / "missing.png"), "--steps", "1", "--repeats", "1", "--json", str(out)]) == 1
    assert "latent_train_speed: " in capsys.readouterr().out


def test_context_bound_codes_grids_as_the_file_does_and_fits_the_causal_model(tmp_path, capsys):
    from PIL import Image
    from scipy import stats

    from kanimg.compress import latent
    from kanimg.compress.entropy import cost_bits
    from kanimg.compress.neural import CompressConfig, compress_image
    from kanimg.io import load_image

    bench = load("context_bound")
    rng = np.random.default_rng(0)
    sparse = np.round(rng.laplace(0, 0.6, (40, 52))).astype(np.int64)
    # without prediction: the bits of the streams and headers the coder itself writes
    level, streams, models = latent.code_grid(sparse)
    written = sum(cost_bits(s, m, level.limit) for s, m in zip(streams, models))
    written += latent.MODEL_BITS * len(models) + latent.STAGE_BITS * len(level.buckets)
    assert bench.nested_bits(sparse, predict=False) == pytest.approx(written)

    # the causal model on i.i.d. Laplace integers: their entropy (scipy's CDF), plus its parameters
    scale = 3.0
    noise = np.round(rng.laplace(0, scale, (64, 64))).astype(np.int64)
    support = np.arange(-80, 81)
    mass = stats.laplace.cdf(support + 0.5, scale=scale) - stats.laplace.cdf(support - 0.5, scale=scale)
    entropy = -np.sum(mass * np.log2(mass))
    parameters = bench.CAUSAL_PARAMETERS * bench.PARAMETER_BITS
    assert bench.causal_bits(noise) - parameters == pytest.approx(noise.size * entropy, rel=0.02)

    # a ramp is its two left neighbours' linear extrapolation: the causal model codes it almost free,
    # and a smooth bump is cheaper predicted from its neighbours' mean than coded as it is
    ramp = np.tile(np.arange(48, dtype=np.int64), (32, 1))
    assert bench.causal_bits(ramp) < 0.25 * bench.nested_bits(ramp, predict=False)
    rows, cols = np.mgrid[0:48, 0:48]
    bump = np.round(40 * np.exp(-((rows - 24) ** 2 + (cols - 20) ** 2) / 200)).astype(np.int64)
    assert bench.nested_bits(bump, predict=True) < 0.8 * bench.nested_bits(bump, predict=False)

    # end to end: an rd folder's latent file and the same file named
    photo = tmp_path / "photo.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((32, 32), Image.LANCZOS).save(photo)
    (tmp_path / "rd" / "kimg").mkdir(parents=True)
    data = compress_image(load_image(photo), 2.0, CompressConfig(model="latent", steps=20)).data
    file = tmp_path / "rd" / "kimg" / "photo-latent-2.0bpp.kimg"
    file.write_bytes(data)
    out = tmp_path / "bound.json"
    assert bench.main([str(tmp_path / "rd"), str(file), "--json", str(out)]) == 0
    first, second = json.loads(out.read_text())["records"]
    assert first["bytes"] == second["bytes"] == len(data) and first["nested"] == second["nested"]
    assert len(first["grids"]) == 7 and first["predicted"] <= first["nested"]
    assert "| photo-latent-2.0bpp.kimg |" in capsys.readouterr().out
    assert bench.main([str(file), "--json", str(photo / "bound.json")]) == 1  # an unwritable output: one line
    assert capsys.readouterr().err.startswith("context_bound: ")
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "missing.kimg")])


def test_grid_coding_speed_codes_each_files_grids_as_the_file_does(tmp_path, capsys):
    from PIL import Image

    from kanimg.compress.neural import CompressConfig, compress_image
    from kanimg.io import load_image

    bench = load("grid_coding_speed")
    photo = tmp_path / "photo.png"
    with Image.open(ROOT / "assets" / "astronaut.png") as im:
        im.convert("RGB").resize((40, 32), Image.LANCZOS).save(photo)
    (tmp_path / "rd" / "kimg").mkdir(parents=True)
    data = compress_image(load_image(photo), 3.0, CompressConfig(model="latent", steps=30)).data
    (tmp_path / "rd" / "kimg" / "photo-latent-3.0bpp.kimg").write_bytes(data)
    out = tmp_path / "speed.json"
    assert bench.main([str(tmp_path / "rd"), "--repeats", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["values"] == sum(-(-40 >> k) * -(-32 >> k) for k in range(7)) and len(row["seconds"]) == 2
    assert 0 < row["bytes"] < len(data)  # the grids, without the file's header and synthesis
    assert "| photo-latent-3.0bpp.kimg | 7 |" in capsys.readouterr().out
    assert bench.main([str(photo), "--json", str(out)]) == 1  # not a .kimg file: one line
    assert capsys.readouterr().err.startswith("grid_coding_speed: ")
    assert bench.main([str(tmp_path / "rd"), "--repeats", "1", "--json", str(photo / "out.json")]) == 1  # unwritable
    assert capsys.readouterr().err.startswith("grid_coding_speed: ")
    with pytest.raises(SystemExit):
        bench.main([str(photo), "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])  # a folder without latent files
