"""Output safety: atomic run folders, output locks, and what may be replaced."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kanimg.errors import KanimgError
from kanimg.files import MARKER, OutputLock, RunFolder, as_stored, check_replaceable, check_writable, staging_folder


def test_a_run_folder_appears_whole_and_replaces_only_with_replace(tmp_path):
    final = tmp_path / "run"
    with RunFolder(final, "fit") as staging:
        assert staging == staging_folder(final) == tmp_path / ".run.partial" and not final.exists()
        (staging / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one" and (final / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging, no lock left
    with pytest.raises(KanimgError, match="already exists"):
        RunFolder(final, "fit")
    with RunFolder(final, "fit", replace=True) as staging:
        (staging / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "b.txt"]


def test_a_failed_run_keeps_its_work_or_leaves_nothing(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with RunFolder(final, "fit"):
            raise RuntimeError("nothing written yet")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with RunFolder(final, "fit") as staging:
            (staging / "checkpoint.pt").write_text("work")
            raise RuntimeError("killed mid-run")
    assert (tmp_path / ".run.partial" / "checkpoint.pt").exists() and not final.exists()
    folder = RunFolder(final, "fit")
    with folder as staging:  # the next run of the same output finds it
        assert folder.leftover and (staging / "checkpoint.pt").exists()
        folder.clear()
        assert not folder.leftover and [p.name for p in staging.iterdir()] == [MARKER]
    assert sorted(p.name for p in final.iterdir()) == [MARKER]


def test_only_folders_kanimg_wrote_are_ever_replaced(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(KanimgError, match="not a folder kanimg wrote"):
        RunFolder(mine, "fit", replace=True)
    with pytest.raises(KanimgError, match="not a folder kanimg wrote"):  # not "pass --force", which would not replace it either
        RunFolder(mine, "fit")
    (tmp_path / "empty").mkdir()
    RunFolder(tmp_path / "empty", "fit", replace=True)  # nothing to lose
    legacy = tmp_path / "legacy"  # a run folder from before the marker
    legacy.mkdir()
    (legacy / "metrics.json").write_text("{}")
    (legacy / "checkpoint.pt").write_text("")
    check_replaceable(legacy)
    monkeypatch.chdir(mine)
    for path in (Path("."), Path(".."), Path("/")):
        with pytest.raises(KanimgError, match="current folder or one above"):
            RunFolder(path, "fit", replace=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_leftovers_of_dead_processes_are_removed_and_those_of_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".run.partial-{int(dead.stdout)}", tmp_path / f".run.old-{int(dead.stdout)}"]
    live = tmp_path / f".run.partial-{os.getpid()}"
    for folder in stale + [live]:
        folder.mkdir()
    with RunFolder(tmp_path / "run", "fit"):
        pass
    assert not any(folder.exists() for folder in stale) and live.exists()


HOLD = "import sys, time; from kanimg.files import OutputLock; lock = OutputLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)"


def test_the_output_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KanimgError, match=f"another kanimg process \\(pid {holder.pid}\\)"):
            OutputLock(target).__enter__()
        with pytest.raises(KanimgError, match="another kanimg process"):
            with RunFolder(target, "fit"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        holder.wait(timeout=60)
    with OutputLock(target):
        pass
    assert not (tmp_path / ".run.lock").exists()


def test_check_writable_names_the_folder_and_the_reason(tmp_path):
    check_writable(tmp_path)
    with pytest.raises(KanimgError, match="no such folder"):
        check_writable(tmp_path / "missing")
    if Path("/proc/self").is_dir():  # takes no new files, even for root
        with pytest.raises(KanimgError, match="/proc: cannot write there"):
            check_writable(Path("/proc"))
    assert not [p for p in tmp_path.iterdir()]  # the probe leaves nothing


def test_as_stored_gives_settings_as_a_json_file_gives_them_back(tmp_path):
    settings = {"widths": (16, 3), "grid": 8, 5: {"nested": (1.5, None)}}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    stored = json.loads(path.read_text())
    assert as_stored(settings) == stored == {"widths": [16, 3], "grid": 8, "5": {"nested": [1.5, None]}}
    assert as_stored(settings) != settings  # the tuples and the int key differ as they were given
