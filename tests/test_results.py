"""The one results schema (kanimg.results): payload, CSV, Markdown, means."""
import csv
import json

import pytest

from kanimg.results import describe_protocol, markdown_table, mean_records, record_table, results_payload, write_results


def test_means_are_per_model_over_all_images_or_none():
    """A value missing on one image (an exact reconstruction's infinite PSNR, stored as null; an
    undefined SSIM) makes the mean None: a mean of the other images had read as one over all."""
    records = [{"image": "a", "model": "kan", "psnr": 30.0, "lpips": None, "params": 10},
               {"image": "b", "model": "kan", "psnr": 34.0, "lpips": 0.2, "params": 11},
               {"image": "a", "model": "mlp", "psnr": 20.0, "lpips": None, "params": 7},
               {"image": "b", "model": "mlp", "psnr": float("inf"), "lpips": 0.3, "params": 7}]
    means = mean_records(records, keys=("psnr", "lpips", "params"))
    assert [m["model"] for m in means] == ["kan", "mlp"] and [m["images"] for m in means] == [2, 2]
    assert means[0]["psnr"] == pytest.approx(32.0) and means[0]["lpips"] is None and means[0]["params"] == 10
    assert means[1]["psnr"] is None and means[1]["lpips"] is None and means[1]["params"] == 7


def test_every_experiment_writes_the_same_three_files(tmp_path):
    protocol = {"kind": "time", "budget_seconds": 30.0}
    records = [{"image": "a", "model": "kan", "psnr": 31.234, "protocol": protocol},
               {"image": "a", "model": "mlp", "psnr": float("nan"), "protocol": protocol}]
    payload = results_payload("compare", protocol, records, mean_records(records, keys=("psnr",)), extra=[1, 2])
    write_results(tmp_path, payload, csv_keys=["image", "model", "psnr", "protocol"], markdown="# table\n")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [saved[k] for k in ("kind", "protocol", "extra")] == ["compare", protocol, [1, 2]]
    assert saved["records"][1]["psnr"] is None  # NaN is not JSON: null
    assert set(saved["machine"]) >= {"processor", "cpu_count", "torch_threads"} and "torch" in saved["versions"]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["model"] for r in rows] == ["kan", "mlp"] and rows[0]["protocol"] == describe_protocol(protocol)
    assert (tmp_path / "results.md").read_text() == "# table\n"


def test_tables_format_cells_and_say_n_a_for_missing_values():
    table = record_table([{"model": "kan", "psnr": 31.234, "params": 12345, "lpips": None}])
    header, sep, row = table.splitlines()
    assert header.startswith("| model | PSNR (dB) |") and sep.startswith("|---|---:|")
    assert row.startswith("| kan | 31.23 | n/a |") and "12,345" in row
    assert markdown_table(["a", "b"], [["x", "1"]]).splitlines()[2] == "| x | 1 |"
    assert "0.1, 0.5 bpp" in describe_protocol({"kind": "rd", "bpp_targets": [0.1, 0.5]})


def test_the_source_digest_changes_with_any_source_file_and_keys_kept_trainings(tmp_path, monkeypatch):
    import numpy as np

    from kanimg.compress import resume
    from kanimg.io import as_image
    from kanimg.results import source_digest, versions

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("X = 1\n")
    (package / "sub" / "b.py").write_text("Y = 2\n")
    (package / "notes.txt").write_text("not source")
    digests = [source_digest.__wrapped__(package)]
    (package / "notes.txt").write_text("still not source")
    digests.append(source_digest.__wrapped__(package))
    (package / "sub" / "b.py").write_text("Y = 3\n")  # one constant changed
    digests.append(source_digest.__wrapped__(package))
    (package / "sub" / "b.py").rename(package / "c.py")  # the same bytes elsewhere
    digests.append(source_digest.__wrapped__(package))
    assert digests[0] == digests[1] and len(set(digests[1:])) == 3
    assert versions()["kanimg_source"] == source_digest()

    image = as_image(np.zeros((4, 4), dtype=np.uint8))
    key = resume.training_key(image, codec="latent", steps=10)
    monkeypatch.setattr("kanimg.results.source_digest", lambda: "edited")
    assert resume.training_key(image, codec="latent", steps=10) != key
