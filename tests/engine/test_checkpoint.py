"""Checkpoints in process, without a model: a collector state survives a save and a load unchanged, the settings
and the file format are checked with messages that say what to do, a failed save leaves the previous checkpoint and
no temporary file, and the signal flag turns SIGTERM / SIGINT into a clean stop.

The collector state is filled with random values of whatever keys, shapes and dtypes
:meth:`GridCollector.state` has, so these tests do not depend on how the collector lays out its sums."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attnscan._io import leftover_prefix
from attnscan.engine import checkpoint
from attnscan.engine.accumulate import GridCollector
from attnscan.engine.checkpoint import (
    FORMAT,
    Interrupted,
    StopFlag,
    checkpoint_file,
    load_checkpoint,
    save_checkpoint,
    stop_on_signals,
    try_save_checkpoint,
)
from attnscan.errors import AttnscanError

SETTINGS: dict[str, Any] = {"length": 12, "layers": [0, 1], "model": "tiny", "out": Path("/somewhere/bundle")}


def _collector(name: str, n_prompts: int = 5) -> GridCollector:
    return GridCollector(name, (0, 1), n_prompts, 12)


def _fill(collector: GridCollector, seed: int, seen: int) -> dict[str, torch.Tensor]:
    """Random values in every state tensor (``seen`` of the prompts marked seen); returns a copy of the state."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in collector.state().items():
        if key == "seen":
            new = torch.zeros_like(value)
            new[:seen] = True
        elif value.dtype.is_floating_point:
            new = torch.rand(value.shape, generator=gen, dtype=torch.float64).to(value.dtype)
        elif value.dtype == torch.bool:
            new = torch.rand(value.shape, generator=gen) > 0.5
        else:
            new = torch.randint(0, 50, value.shape, generator=gen, dtype=value.dtype)
        state[key] = new
    collector.load_state(state)
    return {key: t.clone() for key, t in collector.state().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_checkpoint_file_names_one_file_per_rank(tmp_path: Path) -> None:
    assert checkpoint_file(tmp_path) == tmp_path / "rank0.safetensors"
    assert checkpoint_file(str(tmp_path), 3) == tmp_path / "rank3.safetensors"


def test_a_save_and_a_load_give_back_every_set_and_count_the_prompts_done(tmp_path: Path) -> None:
    path = checkpoint_file(tmp_path / "deep" / "er")  # the directory is made, parents included
    first, second = _collector("benign"), _collector("jailbreak", n_prompts=4)
    states = {"benign": _fill(first, 0, seen=3), "jailbreak": _fill(second, 1, seen=2)}
    save_checkpoint(path, SETTINGS, {"benign": first, "jailbreak": second})
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == FORMAT == "attnscan-checkpoint"
    assert json.loads(meta["settings"]) == {**SETTINGS, "out": "/somewhere/bundle"}  # paths written as text
    assert keys == {f"{name}/{key}" for name in states for key in GridCollector.STATE_KEYS}
    fresh = {"benign": _collector("benign"), "jailbreak": _collector("jailbreak", n_prompts=4)}
    assert load_checkpoint(path, dict(SETTINGS), fresh) == 3 + 2
    for name, collector in fresh.items():
        _same_state(collector.state(), states[name])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_save_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    path = checkpoint_file(tmp_path)
    col = _collector("s")
    _fill(col, 0, seen=1)
    save_checkpoint(path, SETTINGS, {"s": col})
    later = _fill(col, 1, seen=4)
    save_checkpoint(path, SETTINGS, {"s": col})
    fresh = _collector("s")
    assert load_checkpoint(path, SETTINGS, {"s": fresh}) == 4
    _same_state(fresh.state(), later)


def test_the_leftover_of_a_killed_save_is_swept(tmp_path: Path) -> None:
    path = checkpoint_file(tmp_path)
    dead = 2**22 + 12345  # above the default pid_max of 2**22: no such process
    leftover = tmp_path / (leftover_prefix(path).replace(f"-{os.getpid()}-", f"-{dead}-") + "x.safetensors")
    leftover.write_bytes(b"half a checkpoint")
    save_checkpoint(path, SETTINGS, {"s": _collector("s")})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = checkpoint_file(tmp_path)
    col = _collector("s")
    before = _fill(col, 0, seen=2)
    save_checkpoint(path, SETTINGS, {"s": col})
    _fill(col, 1, seen=5)
    names: list[Path] = []

    def full(tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str]) -> None:
        names.append(Path(name))
        Path(name).write_bytes(b"part of it")  # the disk fills up half-way (or Ctrl-C arrives)
        raise error

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(type(error)):
        save_checkpoint(path, SETTINGS, {"s": col})
    # written beside the checkpoint under a name the sweep of a later save recognises, then removed
    (tmp,) = names
    assert tmp.parent == path.parent and tmp.name.startswith(leftover_prefix(path)) and tmp.suffix == ".safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    fresh = _collector("s")
    assert load_checkpoint(path, SETTINGS, {"s": fresh}) == 2
    _same_state(fresh.state(), before)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.ENOSPC, "x"), "No space left on device"),
        (RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"), "Disk quota exceeded"),
        (OSError("no errno at all"), "no errno at all"),
    ],
)
def test_try_save_warns_about_a_refused_write_and_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(checkpoint, "save_file", refuse)
    path = checkpoint_file(tmp_path)
    with pytest.warns(UserWarning, match="could not save the checkpoint") as record:
        assert try_save_checkpoint(path, SETTINGS, {"s": _collector("s")}) is False
    (warning,) = record
    text = str(warning.message)
    assert text == (
        f"could not save the checkpoint {path} ({reason}); the scan goes on and tries again at the next checkpoint "
        "(a resume now would start from the previous one)"
    )
    assert warning.category is UserWarning
    # reported at a caller, not inside the module (not "== this file": under mutmut a trampoline is the caller)
    assert Path(warning.filename).name != "checkpoint.py"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: silent
        assert try_save_checkpoint(path, SETTINGS, {"s": _collector("s")}, warn=False) is False


def test_try_save_returns_true_and_lets_other_errors_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert try_save_checkpoint(path, SETTINGS, {"s": _collector("s")}) is True
    assert path.is_file()

    def bug(*args: Any, **kwargs: Any) -> None:
        raise TypeError("a bug, not the disk")

    monkeypatch.setattr(checkpoint, "save_file", bug)
    with pytest.raises(TypeError, match="a bug"):
        try_save_checkpoint(path, SETTINGS, {"s": _collector("s")})


# ------------------------------------------------------------------------------------------ refused checkpoints


def _raw(path: Path, meta: dict[str, str] | None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata=meta)
    return path


def test_a_damaged_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rank0.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AttnscanError, match=r"^cannot read checkpoint .*rank0\.safetensors \(.+\): delete it to"):
        load_checkpoint(path, SETTINGS, {})


@pytest.mark.parametrize("meta", [None, {"format": "something-else", "settings": "{}"}, {"settings": "{}"}])
def test_a_foreign_file_is_refused(tmp_path: Path, meta: dict[str, str] | None) -> None:
    path = _raw(tmp_path / "f.safetensors", meta)
    with pytest.raises(AttnscanError, match=r"f\.safetensors is not an attnscan checkpoint: delete it or choose"):
        load_checkpoint(path, {}, {})


@pytest.mark.parametrize("settings", ["{not json", "[1, 2]", "3"])
def test_unreadable_settings_are_refused(tmp_path: Path, settings: str) -> None:
    path = _raw(tmp_path / "f.safetensors", {"format": FORMAT, "settings": settings})
    with pytest.raises(AttnscanError, match=r"^checkpoint .*f\.safetensors has unreadable settings: delete it"):
        load_checkpoint(path, {}, {})


def test_missing_settings_mean_none_were_recorded(tmp_path: Path) -> None:
    path = _raw(tmp_path / "f.safetensors", {"format": FORMAT})
    assert load_checkpoint(path, {}, {}) == 0
    with pytest.raises(AttnscanError, match=r"different settings \(length\)"):
        load_checkpoint(path, {"length": 12}, {})


def test_other_settings_are_refused_and_listed_in_order(tmp_path: Path) -> None:
    path = checkpoint_file(tmp_path)
    save_checkpoint(path, SETTINGS, {"s": _collector("s")})
    other = {**SETTINGS, "model": "other", "length": 13, "extra": 1}
    del other["layers"]
    with pytest.raises(
        AttnscanError,
        match=r"^checkpoint .* was made with different settings \(extra, layers, length, model\): rerun with the same "
        r"options, or delete the checkpoint to start over$",
    ):
        load_checkpoint(path, other, {"s": _collector("s")})
    # equal after the JSON round trip: a tuple is a list, a Path its text
    same = {**SETTINGS, "layers": (0, 1), "out": "/somewhere/bundle"}
    assert load_checkpoint(path, same, {"s": _collector("s")}) == 0


def test_a_checkpoint_without_a_set_is_refused(tmp_path: Path) -> None:
    path = checkpoint_file(tmp_path)
    save_checkpoint(path, SETTINGS, {"benign": _collector("benign")})
    with pytest.raises(
        AttnscanError, match=r"^checkpoint .* does not fit this scan \(set jailbreak: KeyError .*\): delete it to start"
    ):
        load_checkpoint(path, SETTINGS, {"benign": _collector("benign"), "jailbreak": _collector("jailbreak")})


def test_interrupted_exits_130() -> None:
    assert Interrupted.exit_code == 130 and issubclass(Interrupted, AttnscanError)


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(("sig", "name"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_a_signal_sets_the_flag_and_the_old_handlers_come_back(sig: signal.Signals, name: str) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals() as flag:
        assert not flag and flag.signal is None
        os.kill(os.getpid(), sig)
        assert flag and flag.signal == name
    assert {s: signal.getsignal(s) for s in before} == before


def test_disabled_or_off_the_main_thread_the_handlers_stay() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(enabled=False) as flag:
        assert isinstance(flag, StopFlag) and not flag
        assert {s: signal.getsignal(s) for s in before} == before
    seen: list[Any] = []

    def in_thread() -> None:
        with stop_on_signals() as flag:
            seen.append((bool(flag), {s: signal.getsignal(s) for s in before}))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [(False, before)]
