"""The benchmark scripts run and report every variant (their figures are not asserted: timing
targets are measured by the scripts, not by unit tests)."""
import importlib.util
import json
from pathlib import Path

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
    assert set(rows) == {"fast", "fast-torch", "percentile", "reference", "mlp", "floor"}
    assert rows["fast"]["saved_bytes_per_sample"] == rows["fast-torch"]["saved_bytes_per_sample"]
    assert rows["percentile"]["saved_bytes_per_sample"] == rows["fast"]["saved_bytes_per_sample"]
    # the fast layer saves only its inputs: 4 bytes per input feature per sample (+ MSE's 2 × 4)
    assert rows["fast"]["saved_bytes_per_sample"] == 4 * (2 + 8 + 8) + 8
    assert rows["reference"]["saved_bytes_per_sample"] > 5 * rows["fast"]["saved_bytes_per_sample"]
    assert "x floor" in capsys.readouterr().out


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
