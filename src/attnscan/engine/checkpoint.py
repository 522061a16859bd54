"""Checkpoints of a scan in progress, and clean stops on SIGTERM / SIGINT.

A checkpoint is one safetensors file per process (``rank{R}.safetensors`` in the checkpoint directory) holding every
set's collector state (:meth:`GridCollector.state`) and, in its metadata, the settings that produced it. It is
replaced atomically (temporary file, then ``os.replace``), so a scan killed at any moment leaves either the previous
checkpoint or the new one; the temporary files of killed scans are removed by the next save. A save that fails (a
full disk, a flaky network file system) does not end the scan: :func:`try_save_checkpoint` warns and the scan goes
on, with the previous checkpoint still in place. Resuming refuses a checkpoint whose settings differ from the
current scan's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from .._io import leftover_prefix, os_errno, sweep_leftovers
from ..errors import AttnscanError
from .accumulate import GridCollector

FORMAT = "attnscan-checkpoint"


class Interrupted(AttnscanError):
    """The scan was stopped by a signal after saving a checkpoint; rerun with ``--resume`` to continue."""

    exit_code = 130


def checkpoint_file(directory: str | Path, rank: int = 0) -> Path:
    return Path(directory) / f"rank{rank}.safetensors"


def save_checkpoint(path: Path, settings: Mapping[str, Any], collectors: Mapping[str, GridCollector]) -> None:
    """Write every collector's state and the settings to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}/{key}": t.contiguous() for name, c in collectors.items() for key, t in c.state().items()}
    meta = {"format": FORMAT, "settings": json.dumps(settings, sort_keys=True, default=str)}
    sweep_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=leftover_prefix(path), suffix=".safetensors", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def try_save_checkpoint(
    path: Path, settings: Mapping[str, Any], collectors: Mapping[str, GridCollector], *, warn: bool = True
) -> bool:
    """:func:`save_checkpoint`, except that a write the disk refused (full, over quota, gone) is a warning instead of
    the end of the scan; the previous checkpoint stays in place. Returns whether the checkpoint was saved.

    A warning, not a notice: it must be seen even by a scan run without progress output (``--quiet``). ``warn=False``
    keeps it silent (a scan warns once per run of failed saves, not at every batch of a disk that stays full)."""
    try:
        save_checkpoint(path, settings, collectors)
    except Exception as exc:  # OSError, or safetensors' own error type carrying the OS error
        code = os_errno(exc)
        if not isinstance(exc, OSError) and code is None:
            raise
        reason = os.strerror(code) if code else str(exc)
        if not warn:
            return False
        warnings.warn(
            f"could not save the checkpoint {path} ({reason}); the scan goes on and tries again at the next "
            "checkpoint (a resume now would start from the previous one)",
            UserWarning,
            stacklevel=2,
        )
        return False
    return True


def load_checkpoint(path: Path, settings: Mapping[str, Any], collectors: Mapping[str, GridCollector]) -> int:
    """Restore the collectors from ``path``; refuse it if it was made with other settings. Returns prompts done."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # a damaged file raises safetensors' own error types
        raise AttnscanError(f"cannot read checkpoint {path} ({exc}): delete it to start over") from None
    if meta.get("format") != FORMAT:
        raise AttnscanError(f"{path} is not an attnscan checkpoint: delete it or choose another --checkpoint")
    try:
        saved = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise AttnscanError(f"checkpoint {path} has unreadable settings: delete it to start over")
    current = json.loads(json.dumps(settings, sort_keys=True, default=str))
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        raise AttnscanError(
            f"checkpoint {path} was made with different settings ({', '.join(differ)}): rerun with the same "
            "options, or delete the checkpoint to start over"
        )
    done = 0
    for name, collector in collectors.items():
        try:
            collector.load_state({key: tensors[f"{name}/{key}"] for key in GridCollector.STATE_KEYS})
        except (KeyError, RuntimeError, ValueError) as exc:  # a missing tensor, or one of the wrong shape
            raise AttnscanError(
                f"checkpoint {path} does not fit this scan (set {name}: {type(exc).__name__} {exc}): delete it to "
                "start over"
            ) from None
        done += int(collector.seen.sum())
    return done


class StopFlag:
    """Set by SIGTERM or SIGINT while :func:`stop_on_signals` is active."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopFlag]:
    """Turn SIGTERM and SIGINT into a flag the scan checks between batches (main thread only)."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
