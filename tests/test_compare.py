"""Comparisons: protocols, resumable runs, and the gallery outputs (checked in headless Chromium)."""
import json
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image

from conftest import photo_crop
from kanimg.cli import main
from kanimg.comparison import compare, param_count, widths_for_params
from kanimg.errors import KanimgError
from kanimg.train import Trainer

TINY = ["kan", "mlp"]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo_crop(16)).save(folder / "face.png")
    Image.fromarray(photo_crop(16, box=(150, 180))).save(folder / "suit.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_compare_folder_writes_every_output_and_skips_finished_runs(photos, tmp_path):
    out = tmp_path / "cmp"
    result = compare(photos, TINY, out, steps=15, progress=False)
    assert not result.interrupted
    assert [(r["image"], r["model"]) for r in result.records] == [("face", "kan"), ("face", "mlp"), ("suit", "kan"), ("suit", "mlp")]
    for name in ("index.html", "results.json", "results.csv", "results.md", "gallery-face.png", "gallery-suit.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["records"]) == 4 and [m["model"] for m in saved["mean"]] == TINY
    assert saved["kind"] == "compare" and saved["protocol"] == {"kind": "steps", "steps": 15} and {"machine", "versions"} <= set(saved)
    kan = [r["psnr"] for r in saved["records"] if r["model"] == "kan"]
    assert saved["mean"][0]["psnr"] == pytest.approx(sum(kan) / 2) and saved["mean"][0]["images"] == 2
    for record in saved["records"]:
        for key in ("model", "psnr", "ssim", "lpips", "params", "seconds", "protocol"):
            assert key in record
        assert record["protocol"] == {"kind": "steps", "steps": 15} and record["steps"] == 15
    assert "Mean over images" in (out / "results.md").read_text()
    assert len((out / "results.csv").read_text().strip().splitlines()) == 5
    # a second run with the same request trains nothing
    with mock.patch("kanimg.reruns.fit", side_effect=AssertionError("should have been skipped")):
        again = compare(photos, TINY, out, steps=15, progress=False)
    assert [r["psnr"] for r in again.records] == [r["psnr"] for r in result.records]


def test_a_comparison_holds_one_photo_at_a_time(photos, tmp_path, monkeypatch):
    """A folder of large photos must not be in memory at once (every photo loaded was kept to the end)."""
    import gc
    import weakref

    from kanimg import comparison

    real_load, originals = comparison.load_image, []

    def load_alone(path, *a, **k):
        image = real_load(path, *a, **k)
        if Path(path).name != "reconstruction.png":
            gc.collect()
            assert all(ref() is None for ref in originals), "an earlier photo is still held"
            originals.append(weakref.ref(image))
        return image

    monkeypatch.setattr(comparison, "load_image", load_alone)
    result = compare(photos, TINY, tmp_path / "cmp", steps=3, progress=False)
    assert not result.interrupted and len(result.records) == 4 and len(originals) >= 2


def test_interrupted_comparison_resumes_where_it_stopped(photos, tmp_path):
    image = photos / "face.png"
    out = tmp_path / "cmp"
    original = Trainer._before_step
    state = {"calls": 0}

    def before(self):  # Ctrl-C in the middle of the second model
        if self.model.spec["name"] == "mlp" and self.step == 10:
            raise KeyboardInterrupt
        return original(self)

    with mock.patch.object(Trainer, "_before_step", before):
        first = compare(image, TINY, out, steps=20, progress=False)
    assert first.interrupted and [r["model"] for r in first.records] == ["kan"]
    from kanimg import reruns

    real_fit = reruns.fit

    def spy(*args, **kwargs):
        state["calls"] += 1
        assert args[1] == "mlp" and kwargs["resume"] is not None  # kan skipped, mlp resumed
        return real_fit(*args, **kwargs)

    with mock.patch("kanimg.reruns.fit", spy):
        second = compare(image, TINY, out, steps=20, progress=False)
    assert state["calls"] == 1 and not second.interrupted
    assert [r["steps"] for r in second.records] == [20, 20]


@pytest.mark.parametrize("left,option", [("marker", "lr"), ("no marker", "lr"), ("marker", "batch_size")])
def test_a_run_trained_under_other_defaults_is_fitted_again_not_reused(photos, tmp_path, left, option):
    """After an upgrade that changes a family's defaults (its learning rate or batch size, say),
    the same command must not report the old run as today's model, whether its compare marker
    was written or it was killed before that; under the same defaults it is reused either way."""
    from kanimg import reruns
    from kanimg.models import get_entry

    image = photos / "face.png"
    out = tmp_path / "cmp"
    compare(image, TINY, out, steps=15, progress=False)
    marker = out / "runs" / "face" / "mlp" / "compare-request.json"

    def leave_as_case():
        if left == "no marker":
            marker.unlink()

    leave_as_case()
    real_fit, calls = reruns.fit, []

    def spy(*args, **kwargs):
        calls.append((args[1], kwargs.get("resume")))
        return real_fit(*args, **kwargs)

    mlp = get_entry("mlp")
    value = mlp.train_defaults[option]
    changed = {option: value // 2 if isinstance(value, int) else value / 2}
    with mock.patch("kanimg.reruns.fit", spy):
        compare(image, TINY, out, steps=15, progress=False)  # the same defaults: the run is kept
    assert calls == [] and marker.exists()  # reused, and marked again for run_record
    calls.clear()
    leave_as_case()
    with mock.patch.dict(mlp.train_defaults, changed), mock.patch("kanimg.reruns.fit", spy):
        again = compare(image, TINY, out, steps=15, progress=False)
    assert calls == [("mlp", None)]  # kan reused; mlp fitted anew, not resumed from the old run
    saved = json.loads((out / "runs" / "face" / "mlp" / "metrics.json").read_text())
    assert saved["config"]["train"][option] == pytest.approx(changed[option]) and not again.interrupted
    with mock.patch.dict(mlp.train_defaults, changed), \
            mock.patch("kanimg.reruns.fit", side_effect=AssertionError("should have been skipped")):
        compare(image, TINY, out, steps=15, progress=False)  # under the same defaults: reused


def test_equal_time_protocol_gives_each_model_the_budget(photos, tmp_path):
    result = compare(photos / "face.png", TINY, tmp_path / "t", budget_seconds=0.4, progress=False)
    for r in result.records:
        assert r["protocol"] == {"kind": "time", "budget_seconds": 0.4}
        assert r["seconds"] >= 0.4 and r["steps"] >= 1  # trained until the budget was spent (no upper bound: machines vary)


@pytest.mark.parametrize("name", ["kan-ridge", "siren", "mlp", "rff", "kan2", "siren2"])
def test_match_params_solves_widths_close_to_the_target(name):
    spec = widths_for_params(name, 3, 100_000)
    count = param_count(name, spec)
    width = spec["widths"][1]
    one_wider = param_count(name, {**spec, "widths": [2] + [width + 1] * (len(spec["widths"]) - 2) + [3]})
    assert abs(count - 100_000) <= (one_wider - count)  # as close as integer widths allow
    assert spec["widths"][0] == 2 and spec["widths"][-1] == 3


def test_match_params_refuses_a_model_without_hidden_width_in_one_line():
    with pytest.raises(KanimgError, match="kan has no hidden layer"):  # the default KAN: one layer on its encoding
        widths_for_params("kan", 3, 100_000)


def test_an_output_folder_holding_something_else_is_refused(photos, tmp_path, capsys):
    out = tmp_path / "cmp"
    compare(photos / "face.png", ["mlp"], out, steps=5, progress=False)
    index = (out / "index.html").read_bytes()
    with pytest.raises(KanimgError, match="holds another comparison"):
        compare(photos / "face.png", ["mlp"], out, steps=6, progress=False)
    assert (out / "index.html").read_bytes() == index
    again = compare(photos / "face.png", ["mlp"], out, steps=6, force=True, progress=False)  # the run is extended
    assert again.records[0]["steps"] == 6 and again.records[0]["finished"]
    fewer = compare(photos / "face.png", ["mlp"], out, steps=5, force=True, progress=False)  # not cut short: fitted anew
    assert fewer.records[0]["steps"] == 5 and json.loads((out / "runs/face/mlp/metrics.json").read_text())["resumed_from_step"] is None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    for force in (False, True):
        assert main(["compare", str(photos / "face.png"), "--models", "mlp", "--steps", "5", "-o", str(mine), "-q"]
                    + (["--force"] if force else [])) == 2
        assert "not a folder kanimg wrote" in capsys.readouterr().err
    assert (mine / "index.html").read_text() == "my page" and sorted(p.name for p in mine.iterdir()) == ["index.html"]


def test_a_killed_run_of_a_comparison_is_resumed_from_its_staged_checkpoint(photos, tmp_path):
    out = tmp_path / "cmp"
    compare(photos / "face.png", ["mlp"], out, steps=10, progress=False)
    run = out / "runs" / "face" / "mlp"
    staging = run.parent / ".mlp.partial"  # what a kill -9 during a fit leaves: a periodic checkpoint, no run folder
    staging.mkdir()
    shutil.copy(run / "checkpoint.pt", staging / "checkpoint.pt")
    shutil.rmtree(run)
    from kanimg import reruns

    real_fit, calls = reruns.fit, []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real_fit(*args, **kwargs)

    with mock.patch("kanimg.reruns.fit", spy):
        again = compare(photos / "face.png", ["mlp"], out, steps=10, progress=False)
    assert calls == [True] and again.records[0]["finished"]
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 10
    assert not staging.exists()


def test_compare_bad_input(photos, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KanimgError, match="no image files"):
        compare(tmp_path / "empty", TINY, tmp_path / "o")
    with pytest.raises(KanimgError, match="unknown model"):
        compare(photos, ["kan", "vit"], tmp_path / "o")
    with pytest.raises(KanimgError, match="unknown preset"):
        compare(photos, None, tmp_path / "o", preset="paper-slow")
    (tmp_path / "twins").mkdir()
    for name in ("photo.png", "photo.jpg"):
        shutil.copy(sorted(Path(photos).iterdir())[0], tmp_path / "twins" / name)
    with pytest.raises(KanimgError, match="share the name 'photo'"):
        compare(tmp_path / "twins", TINY, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert main(["compare", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o2")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--crop", "10,10,20,20"], "--crop 10,10,20,20 is outside face.png \\(16x16\\)"),
    (["--models", "kan,siren", "--match-params", "20000"], "kan has no hidden layer"),
    (["--budget-seconds", "inf"], "positive and finite"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--seed", "-1"], "seed must be a whole number"),
    ([], "notes.png: not an image file"),
])
def test_a_refused_comparison_leaves_nothing_and_trains_nothing(photos, tmp_path, capsys, args, message):
    """Every refusal comes before the folder is claimed and before the first model trains: a
    crop outside an image had failed in the gallery after all the training, and a refused
    request had left a folder that then refused the corrected command."""
    (photos / "notes.txt").rename(photos / "notes.png")  # in the folder, after the good photos
    out = tmp_path / "cmp"
    with mock.patch("kanimg.reruns.fit", side_effect=AssertionError("trained before the checks")):
        assert main(["compare", str(photos), "--steps", "2", *args, "-o", str(out), "-q"]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


HARNESS = """<!DOCTYPE html><html><body><iframe id="page" src="index.html" width="1200" height="900"></iframe>
<script>
document.getElementById('page').onload = () => {  // fires after every image in the page loaded
  const doc = document.getElementById('page').contentDocument;
  const images = Array.from(doc.querySelectorAll('img:not([id^=viewer])'));  // the viewer's two stay empty until opened
  const decoded = images.map(img => img.complete && img.naturalWidth > 0 ? 1 : 0);
  const rows = Array.from(doc.querySelectorAll('table')).map(t => t.tBodies[0].rows.length);
  doc.querySelector('table th:nth-child(2)').click();  // sort by PSNR: rows stay, order changes
  const sorted = Array.from(doc.querySelectorAll('table')[0].tBodies[0].rows).map(r => r.cells[1].textContent);
  document.body.setAttribute('data-result', JSON.stringify({images: images.length, decoded: decoded.reduce((a, b) => a + b, 0), rows, sorted}));
};
</script></body></html>"""


def run_harness(out: Path, harness: str, tmp_path: Path) -> dict:
    """Open ``harness`` (beside out/index.html) in headless Chromium; its script's JSON result."""
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    (out / "harness.html").write_text(harness)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", (out / "harness.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "data-result=" in dom, (proc.returncode, proc.stderr[-2000:], dom[:500])
    start = dom.index("data-result=") + len("data-result=") + 1
    quote = dom[start - 1]
    import html as html_module

    return json.loads(html_module.unescape(dom[start : dom.index(quote, start)]))


def test_html_report_renders_in_headless_chromium(photos, tmp_path):
    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    out = tmp_path / "cmp"
    compare(photos, TINY, out, steps=10, progress=False)
    result = run_harness(out, HARNESS, tmp_path)
    # per image: original + (reconstruction, error map) per model + the gallery PNG
    assert result["images"] == 2 * (1 + 2 * len(TINY) + 1)
    assert result["decoded"] == result["images"]
    assert result["rows"] == [len(TINY), len(TINY), len(TINY)]  # mean table, then one per image
    psnrs = [float(v) for v in result["sorted"]]
    assert psnrs == sorted(psnrs, reverse=True)


VIEWER_HARNESS = """<!DOCTYPE html><html><body><iframe id="page" src="index.html" width="1000" height="700"></iframe>
<script>
document.getElementById('page').onload = () => {
  const win = document.getElementById('page').contentWindow, doc = win.document, part = id => doc.getElementById(id);
  const result = {hiddenAtFirst: part('viewer').hidden};
  const recon = doc.querySelectorAll('img[data-original]')[1];  // the second model of the first image
  recon.click();
  const before = part('viewer-before'), after = part('viewer-after'), layers = part('viewer-layers');
  result.open = !part('viewer').hidden;
  result.beforeIsOriginal = before.src === part(recon.dataset.original).src;
  result.afterIsReconstruction = after.src === recon.src;
  result.sameContainer = before.parentElement === layers && after.parentElement === layers;
  const slider = part('viewer-split');
  slider.value = 30; slider.dispatchEvent(new win.Event('input'));
  result.clip = before.style.clipPath;
  const scaleOf = () => parseFloat(/scale\\(([^)]+)\\)/.exec(layers.style.transform)[1]);
  const fitted = scaleOf(), stage = part('viewer-stage').getBoundingClientRect();
  part('viewer-stage').dispatchEvent(new win.WheelEvent('wheel', {deltaY: -100, clientX: stage.left + 50, clientY: stage.top + 50, bubbles: true, cancelable: true}));
  result.zoom = scaleOf() / fitted;
  const moved = layers.style.transform;
  part('viewer-stage').dispatchEvent(new win.MouseEvent('mousedown', {clientX: 100, clientY: 100, bubbles: true}));
  win.dispatchEvent(new win.MouseEvent('mousemove', {clientX: 140, clientY: 90}));
  win.dispatchEvent(new win.MouseEvent('mouseup', {}));
  result.panned = layers.style.transform !== moved && scaleOf() / fitted === result.zoom;
  win.dispatchEvent(new win.KeyboardEvent('keydown', {key: 'Escape'}));
  result.closed = part('viewer').hidden;
  document.body.setAttribute('data-result', JSON.stringify(result));
};
</script></body></html>"""


def test_a_reconstruction_opens_against_its_original_with_slider_zoom_and_pan(photos, tmp_path):
    """Click a reconstruction: the viewer shows it under its original, one container (so zoom
    and pan stay in step), the slider clips the original, the wheel zooms, a drag pans, Esc closes."""
    if chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    out = tmp_path / "cmp"
    compare(photos / "face.png", TINY, out, steps=5, progress=False)
    result = run_harness(out, VIEWER_HARNESS, tmp_path)
    assert result["hiddenAtFirst"] and result["open"] and result["closed"]
    assert result["beforeIsOriginal"] and result["afterIsReconstruction"] and result["sameContainer"]
    assert result["clip"] == "inset(0px 70% 0px 0px)"
    assert result["zoom"] == pytest.approx(1.25) and result["panned"]


def test_paper_quick_preset_trains_every_family_with_the_recipe(tmp_path):
    """The paper's four families through its recipe at CI scale: every record complete, every
    model learned (PSNR rose from its first evaluation), on the protocol asked for. Which family
    leads at this scale is a measurement (docs/reproduction.md), not a property to test."""
    result = compare(Path(__file__).resolve().parent.parent / "assets" / "astronaut.png", None, tmp_path / "q",
                     preset="paper-quick", progress=False)
    assert [r["model"] for r in result.records] == ["kan2", "siren2", "rff2-s30", "mlp2"]
    for r in result.records:
        assert r["protocol"] == {"kind": "preset", "preset": "paper-quick"} and r["steps"] == 120 and r["finished"]
        assert all(r[key] is not None for key in ("psnr", "ssim", "params", "seconds")), r["model"]
        assert r["psnr_png"] is not None or r["psnr"] > 50, r["model"]  # None: the 8-bit PNG is the original itself
        curve = r["history"]["eval_psnr"]
        assert r["history"]["eval_step"] == [40, 80, 120] and max(curve) > curve[0], r["model"]
        assert r["psnr"] == pytest.approx(max(curve), abs=0.01)  # the best evaluated weights are the result
