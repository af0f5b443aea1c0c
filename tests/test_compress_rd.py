"""RD experiments: one measurement for every codec, interpolation, and every output written."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import photo_crop
from kanimg.cli import main
from kanimg.compress.bd import bd_psnr, bd_rate
from kanimg.compress.codecs import Point, get_codec, measure, run_sweep
from kanimg.compress.rd import RDConfig, mean_curve, psnr_at
from kanimg.errors import KanimgError
from kanimg.io import load_image
from kanimg.metrics import psnr


@pytest.fixture
def crop(tmp_path):
    path = tmp_path / "crop.png"
    Image.fromarray(photo_crop(32)).save(path)
    return path


@pytest.mark.parametrize("name", ["jpeg", "webp", "avif"])
def test_pillow_codecs_are_measured_from_their_real_bytes(crop, name):
    image = load_image(crop)
    codec = get_codec(name)
    points = run_sweep(codec, image, [3.0])
    assert points[-1].bpp > 3.0 >= points[-2].bpp  # the sweep stops just past the largest target
    encoded = next(codec.sweep(image, [3.0]))
    point = measure(codec, image, encoded)
    assert point.bpp == 8 * len(encoded.data) / (32 * 32) and point.bytes == len(encoded.data)
    from io import BytesIO
    decoded = np.asarray(Image.open(BytesIO(encoded.data)).convert("RGB")) / 255.0
    assert point.psnr == pytest.approx(psnr(image.pixels, decoded), abs=1e-12)
    assert encoded.data[:4] != b"KIMG"


def test_settings_that_repeat_a_point_are_one_point():
    """JPEG's lowest qualities of a smooth image make files of one size and PSNR: listed once,
    not as several points at one rate (they had shown up as duplicate rows in rd's tables)."""
    from kanimg.io import as_image

    ramp = np.linspace(20, 60, 64)[:, None, None] * np.ones((1, 64, 3))
    image = as_image(ramp.astype(np.uint8))
    codec = get_codec("jpeg")
    every = [measure(codec, image, encoded) for encoded in codec.sweep(image, [0.3, 1.0])]
    points = run_sweep(codec, image, [0.3, 1.0])
    assert len({(p.bytes, p.psnr) for p in every}) < len(every)  # the sweep does repeat itself here
    assert [(p.bytes, p.psnr) for p in points] == list(dict.fromkeys((p.bytes, p.psnr) for p in every))


def test_interpolation_stays_inside_the_measured_range():
    pts = [Point(b, p, 0, "", 0, 0) for b, p in [(0.2, 20.0), (0.4, 24.0), (0.8, 27.0)]]
    assert psnr_at(pts, 0.4) == pytest.approx(24.0)
    assert 20.0 < psnr_at(pts, 0.3) < 24.0
    assert psnr_at(pts, 0.1) is None and psnr_at(pts, 1.0) is None
    bpp, psnr_mean = mean_curve([pts, [Point(b + 0.1, p + 1, 0, "", 0, 0) for b, p in [(0.2, 20.0), (0.4, 24.0)]]])
    assert bpp == pytest.approx([0.25, 0.45]) and psnr_mean == pytest.approx([20.5, 24.5])


def test_bad_rd_options_are_refused(crop, tmp_path, capsys):
    with pytest.raises(KanimgError, match="--models"):
        RDConfig(models=["mlp"])
    with pytest.raises(KanimgError, match="--codecs"):
        RDConfig(codecs=["png"])
    assert main(["rd", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    rgba = tmp_path / "alpha.png"
    Image.fromarray(photo_crop(16, mode="RGBA")).save(rgba)
    assert main(["rd", str(rgba), "--models", "kan", "--codecs", "jpeg", "-o", str(tmp_path / "y"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "jpeg cannot store a RGBA image" in err and "leave it out of --codecs" in err
    assert not (tmp_path / "y").exists()


def test_rd_on_a_small_crop_writes_every_output(crop, tmp_path, capsys):
    out = tmp_path / "rd"  # no --models: compress's latent codec, the KAN and the COIN-style SIREN
    args = ["rd", str(crop), "--codecs", "jpeg,webp,avif", "--bpp", "3,4,6,8",
            "--steps", "25", "--qat-steps", "5", "-o", str(out), "-q"]
    assert main(args) == 0
    assert "results.json" in capsys.readouterr().out
    for name in ("results.json", "results.md", "rd.png"):
        assert (out / name).stat().st_size > 0, name
    kimgs = sorted(p.name for p in (out / "kimg").iterdir())
    assert kimgs == sorted(f"crop-{m}-{b}bpp.kimg" for m in ("latent", "kan", "siren") for b in ("3", "4", "6", "8"))
    results = json.loads((out / "results.json").read_text())
    assert results["bpp_targets"] == [3, 4, 6, 8] and results["reference"] == "jpeg"
    for name in ("latent", "kan", "siren", "jpeg", "webp", "avif"):
        entry = results["codecs"][name]
        assert entry["name"] == name and entry["description"]
        assert len(entry["results"]["bpp"]) == len(entry["results"]["psnr"]) >= 4
        assert set(entry["per_image"]) == {"crop"}
    kan = results["codecs"]["kan"]["per_image"]["crop"]["results"]
    for k, target in enumerate((3, 4, 6, 8)):  # bpp of every point is its file's size
        size = (out / "kimg" / f"crop-kan-{target}bpp.kimg").stat().st_size
        assert kan["bpp"][k] == 8 * size / (32 * 32) and kan["bytes"][k] == size
    assert {"psnr_float", "psnr_quantized_no_qat", "quant", "spec"} <= set(kan)
    for name in ("kan", "siren", "webp", "avif"):
        bd = results["codecs"][name]["bd_vs_jpeg"]
        assert set(bd) == {"bd_rate_percent", "bd_psnr_db", "per_image"}
    assert "bd_vs_webp" not in results["codecs"]["avif"]  # classic codecs: against JPEG only
    for name in ("latent", "kan", "siren"):  # networks: against every classic codec, each curve with its own
        for ref in ("jpeg", "webp", "avif"):
            bd, curve, ref_curve = (results["codecs"][name][f"bd_vs_{ref}"], results["codecs"][name]["per_image"]["crop"]["results"],
                                    results["codecs"][ref]["per_image"]["crop"]["results"])
            assert bd["per_image"]["crop"]["bd_rate_percent"] == bd_rate(ref_curve["bpp"], ref_curve["psnr"], curve["bpp"], curve["psnr"])
            assert bd["per_image"]["crop"]["bd_psnr_db"] == bd_psnr(ref_curve["bpp"], ref_curve["psnr"], curve["bpp"], curve["psnr"])
    assert results["codecs"]["kan"]["bd_vs_webp"]["per_image"]["crop"]["bd_psnr_db"] is not None
    first = results["comparisons"][0]
    assert set(first["others"]) == {"latent", "kan", "siren", "jpeg", "webp", "avif"} - {first["codec"]}
    md = (out / "results.md").read_text()
    assert "| kan |" in md and "BD-rate vs JPEG" in md and "before and after quantisation" in md
    assert "BD metrics against each classic codec" in md and "| latent | crop |" in md
    assert main(args) == 2  # an existing folder is kept unless --force
    assert "already exists" in capsys.readouterr().err


def test_rd_on_a_folder_holds_one_image_at_a_time(tmp_path, monkeypatch):
    """A folder of large photos must not be in memory at once (it held every image twice over:
    a list for the checks, another for the measurements)."""
    import gc
    import weakref

    from kanimg.compress import rd

    folder = tmp_path / "photos"
    folder.mkdir()
    for k, box in enumerate([(0, 0), (150, 120), (60, 200)]):
        Image.fromarray(photo_crop(24, box=box)).save(folder / f"{k}.png")
    loaded = []

    def load_alone(path, *a, **k):
        gc.collect()
        assert all(ref() is None for ref in loaded), "an earlier image is still held"
        image = load_image(path, *a, **k)
        loaded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(rd, "load_image", load_alone)
    assert main(["rd", str(folder), "--models", "kan", "--codecs", "jpeg", "--bpp", "6", "--steps", "2",
                 "--qat-steps", "0", "-o", str(tmp_path / "rd"), "-q"]) == 0
    assert len(loaded) >= 6  # each image checked, then measured
    assert [i["name"] for i in json.loads((tmp_path / "rd" / "results.json").read_text())["images"]] == ["0", "1", "2"]


def test_rd_on_a_folder_gives_per_image_and_mean_curves(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo_crop(32)).save(folder / "a.png")
    Image.fromarray(photo_crop(32, box=(150, 120))).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "rd"
    assert main(["rd", str(folder), "--models", "kan", "--codecs", "jpeg,webp", "--bpp", "5", "--steps", "20",
                 "--qat-steps", "0", "-o", str(out), "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [i["name"] for i in results["images"]] == ["a", "b"]
    for name in ("kan", "jpeg", "webp"):
        per = results["codecs"][name]["per_image"]
        mean = results["codecs"][name]["results"]
        n = min(len(per["a"]["results"]["bpp"]), len(per["b"]["results"]["bpp"]))
        assert mean["bpp"] == pytest.approx([(per["a"]["results"]["bpp"][k] + per["b"]["results"]["bpp"][k]) / 2 for k in range(n)])
    assert (out / "rd-a.png").stat().st_size > 0 and (out / "rd-b.png").stat().st_size > 0
    assert "per image" in (out / "results.md").read_text()
    # the schema every experiment writes (kanimg.results): a record per image × codec × point, each codec's mean curve
    assert results["kind"] == "rd" and results["protocol"]["kind"] == "rd" and results["protocol"]["bpp_targets"] == [5.0]
    for image in ("a", "b"):
        for name in ("kan", "jpeg", "webp"):
            points = results["codecs"][name]["per_image"][image]["results"]
            rows = [r for r in results["records"] if r["image"] == image and r["codec"] == name]
            assert [r["bpp"] for r in rows] == points["bpp"] and [r["psnr"] for r in rows] == points["psnr"]
    for name in ("kan", "jpeg", "webp"):
        assert [m["psnr"] for m in results["mean"] if m["codec"] == name] == results["codecs"][name]["results"]["psnr"]
    assert {"machine", "versions"} <= set(results)
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + len(results["records"])


def test_an_interrupted_rd_keeps_its_network_points_and_continues(crop, tmp_path, capsys):
    """Ctrl-C (or a kill) after the first fitted point: the point is kept in the staging folder,
    and the same command trains only what is missing; other options train anew."""
    from unittest import mock

    from kanimg.compress import neural

    out = tmp_path / "rd"
    args = ["rd", str(crop), "--models", "kan", "--codecs", "jpeg", "--bpp", "4.5,6", "--steps", "20", "--qat-steps", "0",
            "-o", str(out), "-q"]
    real, fitted = neural.compress_image, []

    def fit_then_stop(image, bpp, config):
        if fitted:
            raise KeyboardInterrupt
        fitted.append(bpp)
        return real(image, bpp, config)

    with mock.patch.object(neural, "compress_image", fit_then_stop):
        assert main(args) == 130
    assert fitted == [4.5] and not out.exists()
    cached = sorted(p.name for p in (tmp_path / ".rd.partial" / "points").iterdir())
    assert cached == ["crop-kan-4.5bpp.json", "crop-kan-4.5bpp.kimg"]  # the bpp whole: "4.5" is no file suffix
    first = (tmp_path / ".rd.partial" / "points" / "crop-kan-4.5bpp.kimg").read_bytes()

    def refuse(image, bpp, config):
        fitted.append(("asked", bpp))
        raise KeyboardInterrupt

    with mock.patch.object(neural, "compress_image", refuse):  # other options: the kept point is not theirs
        for other in (["--seed", "3"], ["--bpp", "6"]):  # whose end would delete it: refused without --force
            assert main(args[:-3] + other + ["-o", str(out), "-q"]) == 2
            assert "another rd experiment" in capsys.readouterr().err
        with mock.patch("kanimg.compress.rd.source_digest", lambda: "changed"):  # kanimg edited since: not its point either
            assert main(args) == 2
            assert "another rd experiment" in capsys.readouterr().err
        assert main(args[:-3] + ["--seed", "3", "-o", str(out), "-q", "--force"]) == 130
    assert fitted.pop() == ("asked", 4.5)

    def counting(image, bpp, config):
        fitted.append(bpp)
        return real(image, bpp, config)

    with mock.patch.object(neural, "compress_image", counting):
        assert main(args) == 0
    assert fitted == [4.5, 6.0]  # only the missing point was fitted
    assert (out / "kimg" / "crop-kan-4.5bpp.kimg").read_bytes() == first
    results = json.loads((out / "results.json").read_text())
    assert results["codecs"]["kan"]["results"]["bpp"][0] == 8 * len(first) / (32 * 32)
    assert not (tmp_path / ".rd.partial").exists()
    kept = sorted(p.name for p in (out / "points").iterdir())  # the finished folder keeps its points …
    assert kept == ["crop-kan-4.5bpp.json", "crop-kan-4.5bpp.kimg", "crop-kan-6bpp.json", "crop-kan-6bpp.kimg"]
    (out / "points" / "crop-kan-6bpp.partial.pt").write_bytes(b"a stopped training's state")
    fitted.clear()
    with mock.patch.object(neural, "compress_image", counting):  # … for the same rd with a target more
        assert main(args[:7] + ["6,8", "--steps", "20", "--qat-steps", "0", "-o", str(out), "-q", "--force"]) == 0
    assert fitted == [8.0]  # 6 bpp reused from the replaced folder, 4.5 not asked for
    kept = sorted(p.name for p in (out / "points").iterdir())  # only this experiment's points stay
    assert kept == ["crop-kan-6bpp.json", "crop-kan-6bpp.kimg", "crop-kan-8bpp.json", "crop-kan-8bpp.kimg"]
    assert json.loads((out / "results.json").read_text())["bpp_targets"] == [6.0, 8.0]
    fitted.clear()
    with mock.patch.object(neural, "compress_image", counting):  # other options: nothing of the old folder is theirs
        assert main(args[:7] + ["6,8", "--steps", "20", "--qat-steps", "0", "--seed", "3", "-o", str(out), "-q", "--force"]) == 0
    assert fitted == [6.0, 8.0]


def test_rd_points_never_reach_outside_their_folder(crop, tmp_path):
    """A link where the points belong is removed, not followed (the end prunes the points
    folder); a saved point is read only from plain files (a pipe would block); an experiment
    without networks keeps no points folder."""
    import os

    from kanimg.compress.rd import PointCache
    from kanimg.compress.report import rd_to_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's")
    (tmp_path / ".rd.partial").mkdir()
    (tmp_path / ".rd.partial" / "points").symlink_to(outside)
    out = tmp_path / "rd"
    assert main(["rd", str(crop), "--models", "kan", "--codecs", "jpeg", "--bpp", "6", "--steps", "20", "--qat-steps", "0",
                 "-o", str(out), "-q"]) == 0
    assert os.listdir(outside) == ["keep.txt"]
    assert sorted(p.name for p in (out / "points").iterdir()) == ["crop-kan-6bpp.json", "crop-kan-6bpp.kimg"]
    rd_to_folder(crop, out, RDConfig(models=[], codecs=["jpeg"], bpps=[6.0]), force=True, progress=False)
    assert not (out / "points").exists() and (out / "results.json").is_file()

    cache = PointCache(tmp_path / "cache")
    cache.folder.mkdir()
    key = PointCache.key(load_image(crop), "kan", 6.0, {})
    os.mkfifo(cache._path(key, ".json"))
    cache._path(key, ".kimg").write_bytes(b"KIMG")
    assert cache.load(key) is None  # at once: the pipe is never opened


def test_a_network_point_killed_mid_training_continues_from_its_kept_state(crop, tmp_path, monkeypatch, capsys):
    """The latent codec's training state is kept beside the point's files while it trains, so
    an rd stopped inside a point loses at most CHECKPOINT_SECONDS of it."""
    from kanimg.compress import latent_codec, resume

    out = tmp_path / "rd"
    args = ["rd", str(crop), "--models", "latent", "--codecs", "jpeg", "--bpp", "2", "--steps", "60", "-o", str(out), "-q"]
    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)
    real_keep, real_rate, calls = resume.keep_state, latent_codec.rounded_rate, []

    def keep_then_stop_at_30(path, key, **state):
        assert real_keep(path, key, **state)
        if state["step"] == 30:
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(resume, "keep_state", keep_then_stop_at_30)
    assert main(args) == 130
    import torch

    [kept] = (tmp_path / ".rd.partial" / "points").glob("crop-latent-2bpp-*.partial.pt")
    assert torch.load(kept, weights_only=True)["step"] == 30
    monkeypatch.setattr(resume, "keep_state", real_keep)
    for other in ([a if a != "2" else "3" for a in args], args + ["--seed", "1"]):  # another rd, even at 2 bpp,
        assert main(other) == 2  # would delete or replace it: refused without --force
        assert "another rd experiment" in capsys.readouterr().err and kept.is_file()
        assert torch.load(kept, weights_only=True)["step"] == 30
    monkeypatch.setattr(latent_codec, "rounded_rate", lambda *a: calls.append(1) or real_rate(*a))
    calls.clear()
    assert main(args) == 0
    assert len(calls) == 3  # steps 30, 40, 50: the first 30 were not trained again
    assert not any(p.name.endswith(".partial.pt") for p in out.rglob("*"))


def test_an_rd_plot_with_no_point_in_range_says_so_without_a_warning(tmp_path, recwarn):
    """Every point past the plotted range (a quality sweep that starts above the targets): the
    frame says so, where matplotlib would warn of a legend with nothing in it."""
    from matplotlib.image import imread

    from kanimg.plots import plot_rd

    plot_rd(tmp_path / "empty.png", {"jpeg": {"bpp": [5.0, 6.0], "psnr": [40.0, 42.0]}}, "nothing in range", [0.1, 0.3])
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]
    assert imread(tmp_path / "empty.png").shape[:2] == (550, 770)  # the 7 × 5 in figure at 110 dpi, written whole


def test_every_target_of_every_network_is_checked_before_the_first_fit(crop, tmp_path, capsys):
    from unittest import mock

    out = tmp_path / "rd"
    args = ["rd", str(crop), "--models", "kan,latent", "--codecs", "jpeg", "--bpp", "4,30", "--steps", "20", "-o", str(out), "-q"]
    with mock.patch("kanimg.compress.neural._fit", side_effect=AssertionError("trained")):
        assert main(args) == 2  # 30 bpp is more than the image holds: refused before the 4 bpp points are fitted
        assert "more than the 24 bits per pixel" in capsys.readouterr().err
        args[args.index("4,30")] = "4,0.5"  # 64 bytes: under the smallest KAN file of this crop
        assert main(args) == 2
        assert "less than the smallest kan" in capsys.readouterr().err
        args[args.index("kan,latent")] = "latent"
        args[args.index("4,0.5")] = "4,0.3"  # 38 bytes: under the latent codec's smallest file (78 bytes)
        assert main(args) == 2
        assert "less than the smallest latent file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.png"]  # no output, no staging folder, no lock
