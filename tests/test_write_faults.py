"""Faults while writing: a full disk, a process killed mid-write, a checkpoint that cannot be saved.

Bundles, detectors, reports and checkpoints must leave either the old complete result or nothing, never a half
written one, and a later run must not be confused by what a killed one left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnscan._io import atomic_dir, atomic_file, leftover_prefix, os_error, sweep_leftovers
from attnscan.cli.main import app
from attnscan.errors import AttnscanError
from faults_world import saved_results

runner = CliRunner()
DEV = ["--length", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def made(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scan options, and a reference bundle, detector and report written without faults."""
    saved = saved_results(tmp_path_factory, tiny_model_dir)
    report = tmp_path_factory.mktemp("writes") / "report.html"
    _ok(runner.invoke(app, ["report", str(saved["bundle"]), "--out", str(report)]))
    return {**saved, "reference": saved["bundle"], "report": report}


def _ok(res: Any) -> None:
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _same_accumulators(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "accumulators.safetensors")), load_file(str(b / "accumulators.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.allclose(left[key].double(), right[key].double(), rtol=1e-6, atol=1e-9, equal_nan=True), key


@pytest.fixture
def fail_in_temporaries(monkeypatch: pytest.MonkeyPatch) -> Callable[[BaseException], None]:
    """Make every ``Path.write_text`` into a temporary result (a ``.tmp-`` directory or file) raise ``error``: the
    moment a result is half written (its tensors written, its JSON or HTML not yet)."""
    original = Path.write_text

    def arm(error: BaseException) -> None:
        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
            if any(".tmp-" in part for part in self.parts):
                raise error
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    return arm


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def _old_result(kind: str, made: dict[str, Any], tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of a complete result of ``kind`` (bundle, detector or report) and the command line that rewrites it."""
    old = _copy(
        {"bundle": made["reference"], "detector": made["detector"], "report": made["report"]}[kind],
        tmp_path / ("old.html" if kind == "report" else "old"),
    )
    train = ["detect", "train", *made["common"], "--folds", "2", "--bootstrap", "0"]
    argv = {
        "bundle": [*made["scan"], "--out", str(old), "--overwrite"],
        "detector": [*train, "--out", str(old), "--overwrite"],
        "report": ["report", str(made["reference"]), "--out", str(old)],
    }[kind]
    return old, argv


# --------------------------------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("kind", ["bundle", "detector", "report"])
def test_a_full_disk_keeps_the_old_result_and_says_so(
    kind: str, made: dict[str, Any], tmp_path: Path, fail_in_temporaries: Callable[[BaseException], None]
) -> None:
    old, argv = _old_result(kind, made, tmp_path)
    before = _tree(old)
    fail_in_temporaries(_disk_full())
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device") and "free some space" in last, res.stderr
    assert "Traceback" not in res.stderr
    assert _tree(old) == before, "the old result was changed"
    assert _leftovers(tmp_path) == []


def test_a_full_disk_leaves_nothing_where_there_was_nothing(
    made: dict[str, Any], tmp_path: Path, fail_in_temporaries: Callable[[BaseException], None]
) -> None:
    fail_in_temporaries(_disk_full())
    res = runner.invoke(app, [*made["scan"], "--checkpoint-every", "0", "--out", str(tmp_path / "deep" / "new")])
    assert res.exit_code == 2 and "No space left on device" in res.stderr, res.stderr
    assert not (tmp_path / "deep").exists(), "the parent directories made for the result were left behind"


def test_a_full_disk_at_the_end_of_a_scan_keeps_its_checkpoint_for_resume(
    made: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail_in_temporaries: Callable[[BaseException], None],
) -> None:
    out = tmp_path / "bundle"
    fail_in_temporaries(_disk_full())
    res = runner.invoke(app, [*made["scan"], "--out", str(out)])
    assert res.exit_code == 2 and "rerun the same command with --resume" in res.stderr, res.stderr
    assert not out.exists() and (tmp_path / "bundle.ckpt" / "rank0.safetensors").is_file()
    monkeypatch.undo()  # space was freed
    res = runner.invoke(app, [*made["scan"], "--out", str(out), "--resume"], env={"COLUMNS": "200"})
    _ok(res)
    _same_accumulators(out, made["reference"])


def test_a_failed_checkpoint_save_is_a_notice_and_the_scan_goes_on(
    made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnscan.engine import checkpoint

    real, calls = checkpoint.save_file, []

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) in (2, 3):  # two failures in a row: one warning
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if len(calls) == 5:  # after a good save, again: the form safetensors' writer reports an OS error in
            raise RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
        real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    out = tmp_path / "bundle"
    res = runner.invoke(app, [*made["scan"], "--out", str(out)])  # --quiet: the warnings still show
    _ok(res)
    notices = [line for line in res.stderr.splitlines() if line.startswith("warning: could not save the checkpoint")]
    assert len(notices) == 2 and "No space left on device" in notices[0] and "quota" in notices[1], res.stderr
    assert len(calls) > 5
    _same_accumulators(out, made["reference"])


def test_other_checkpoint_failures_still_stop_the_scan(
    made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnscan.engine import checkpoint

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("a bug, not the disk")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    res = runner.invoke(app, [*made["scan"], "--out", str(tmp_path / "b")])
    assert isinstance(res.exception, TypeError)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.ENOSPC, "x", "f.bin"), "No space left on device: f.bin: the result was not saved"),
        (OSError(errno.EACCES, "x", "f.bin"), "Permission denied: f.bin: check the permissions"),
        (RuntimeError("I/O error: Read-only file system (os error 30)"), "Read-only file system: check"),
    ],
)
def test_disk_and_permission_errors_become_user_errors(error: BaseException, words: str) -> None:
    user = os_error(error)
    assert user is not None and words in str(user)


@pytest.mark.parametrize("error", [OSError(errno.ENOENT, "x"), ValueError("no errno here"), KeyError("k")])
def test_other_errors_stay_what_they_are(error: BaseException) -> None:
    assert os_error(error) is None


# --------------------------------------------------------------------------------------- interrupted writes


@pytest.mark.parametrize("kind", ["bundle", "detector", "report"])
def test_an_interruption_between_files_keeps_the_old_result(
    kind: str, made: dict[str, Any], tmp_path: Path, fail_in_temporaries: Callable[[BaseException], None]
) -> None:
    old, argv = _old_result(kind, made, tmp_path)
    before = _tree(old)
    fail_in_temporaries(KeyboardInterrupt())
    res = runner.invoke(app, argv)
    assert res.exit_code == 130, (res.stdout, res.stderr)  # interrupted, as by Ctrl-C
    assert _tree(old) == before
    assert _leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_killed_writers_are_swept_and_others_kept(tmp_path: Path) -> None:
    final = tmp_path / "result"
    final.mkdir()
    (final / "manifest.json").write_text("{}")
    dead = _dead_pid()
    mine = leftover_prefix(final).replace(f"-{os.getpid()}-", f"-{dead}-")
    killed = [tmp_path / f"{mine}abc", tmp_path / f"{mine}def.html"]
    killed[0].mkdir()
    (killed[0] / "maps.safetensors").write_bytes(b"half")
    killed[1].write_text("<html")
    alive = tmp_path / f"{leftover_prefix(final)}own"  # this process: still running
    other_host = tmp_path / f".result.tmp-elsewhere-{dead}-xyz"
    no_pid = tmp_path / (leftover_prefix(final).replace(f"-{os.getpid()}-", f"-{10**30}-") + "big")
    for path in (alive, other_host, no_pid):
        path.mkdir()
    assert sorted(sweep_leftovers(final)) == sorted(killed)
    assert all(p.exists() for p in (alive, other_host, no_pid)) and (final / "manifest.json").is_file()


def test_a_file_result_is_not_written_over_a_directory(tmp_path: Path) -> None:
    (tmp_path / "table.csv").mkdir()
    with pytest.raises(AttnscanError, match="is a directory: give the name of a file"):
        with atomic_file(tmp_path / "table.csv") as tmp:
            tmp.write_text("never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_result_moved_aside_by_a_killed_writer_is_put_back(tmp_path: Path) -> None:
    final = tmp_path / "result"
    aside = tmp_path / (leftover_prefix(final, "old").replace(f"-{os.getpid()}-", f"-{_dead_pid()}-") + "q1")
    aside.mkdir()
    (aside / "manifest.json").write_text('{"old": true}')
    with pytest.raises(AttnscanError, match="already holds a results bundle"):
        with atomic_dir(final):  # the old result is back before the new one is judged: no --overwrite, refused
            pass
    assert (final / "manifest.json").read_text() == '{"old": true}' and not aside.exists()


# ----------------------------------------------------------------------------------- killed for real (SIGKILL)

KILLER = """
import os, signal, sys
from pathlib import Path
import attnscan.engine.checkpoint as checkpoint

calls = []
real_save = checkpoint.save_file

def save_file(tensors, name, metadata=None):
    calls.append(name)
    if len(calls) == 3:  # the third checkpoint: half written, then the process is killed
        Path(name).write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(tensors, name, metadata=metadata)

checkpoint.save_file = save_file
from attnscan.cli.main import app
app(sys.argv[1:], prog_name="attnscan")
"""


def _killed(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_a_kill_mid_checkpoint_resumes_from_the_last_complete_one(made: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    ckpt = tmp_path / "bundle.ckpt"
    _killed([*made["scan"], "--out", str(out)])
    assert not out.exists() and (ckpt / "rank0.safetensors").is_file()
    assert len(_leftovers(ckpt)) == 1, "the half-written checkpoint should be a temporary file"
    loud = [arg for arg in made["scan"] if arg != "--quiet"]  # the resume notice is progress output
    res = runner.invoke(app, [*loud, "--out", str(out), "--resume"], env={"COLUMNS": "200"})
    _ok(res)
    assert "4 prompts already scanned" in res.stderr, res.stderr  # the 2 complete saves of 2 prompts each
    _same_accumulators(out, made["reference"])
    assert not ckpt.exists() and _leftovers(tmp_path) == []


def test_what_a_killed_bundle_write_leaves_is_swept_by_the_next_run(made: dict[str, Any], tmp_path: Path) -> None:
    """A SIGKILL mid-bundle leaves the half-written temporary directory (as the SIGKILL checkpoint test shows for
    checkpoints, with a real kill); the next write of that bundle removes it and writes the bundle whole."""
    out = _copy(made["reference"], tmp_path / "bundle")
    half = tmp_path / (leftover_prefix(out).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-") + "k9")
    _copy(made["reference"], half)
    (half / "manifest.json").unlink()
    _ok(runner.invoke(app, [*made["scan"], "--out", str(out), "--overwrite"]))
    assert _leftovers(tmp_path) == []
    _same_accumulators(out, made["reference"])
