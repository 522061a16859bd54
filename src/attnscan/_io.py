"""Atomic output: results appear complete or not at all.

A result is written into a temporary sibling (``.NAME.tmp-HOST-PID-XXXX``) and renamed into place in one step. A
process killed on the way leaves that sibling behind; the next write of the same name on the same host removes the
leftovers of processes that no longer run (:func:`sweep_leftovers`), and restores a previous result that a kill
caught in the middle of being replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import AttnscanError

BUNDLE_MARKER = "manifest.json"


def check_output_dir(
    out: Path, overwrite: bool, *, marker: str = BUNDLE_MARKER, what: str = "a results bundle"
) -> None:
    """Refuse an output directory that cannot take new results, before any work is done.

    A missing or empty directory is fine; one holding ``what`` (recognised by its ``marker`` file) only with
    ``overwrite``; anything else never (attnscan does not delete what it did not write).
    """
    out = Path(out)
    sweep_leftovers(out)  # first: a result a killed write had moved aside is put back before it is judged
    if not out.exists():
        return
    if not out.is_dir():
        raise AttnscanError(f"output path {out} exists and is not a directory: choose another --out")
    if (out / marker).is_file():
        if not overwrite:
            raise AttnscanError(f"{out} already holds {what}: pass --overwrite or choose another --out")
        return
    if any(out.iterdir()):
        noun = what.removeprefix("a ").removeprefix("an ")
        raise AttnscanError(f"{out} is not empty and holds no attnscan {noun}: choose a new or empty --out")


@contextlib.contextmanager
def atomic_dir(
    final: Path, overwrite: bool = False, *, marker: str = BUNDLE_MARKER, what: str = "a results bundle"
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    ``final`` is checked first (:func:`check_output_dir` with ``marker`` and ``what``). On any exception the
    temporary directory (and any parent directories this call created) is removed and ``final`` is left as it was.
    """
    final = Path(final)
    check_output_dir(final, overwrite, marker=marker, what=what)
    created: list[Path] = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=leftover_prefix(final, "tmp"), dir=final.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        old: Path | None = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=leftover_prefix(final, "old"), dir=final.parent))
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success the file replaces ``path`` in one rename, with the
    permissions of a normally created file. On any exception the temporary file is removed."""
    path = Path(path)
    if path.is_dir():
        raise AttnscanError(f"{path} is a directory: give the name of a file to write")
    sweep_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=leftover_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def leftover_prefix(final: Path, kind: str = "tmp") -> str:
    """The name prefix of a temporary sibling of ``final`` made by this process (``kind``: ``tmp`` for the result
    being written, ``old`` for the result being replaced); :func:`sweep_leftovers` recognises it."""
    return f".{Path(final).name}.{kind}-{_host()}-{os.getpid()}-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it runs, under another user; overflow: no pid of ours, keep it
        return True
    return True


def sweep_leftovers(final: Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` left by processes of this host that no longer run; if ``final``
    is missing but such a process had moved the previous result aside (killed between the two renames of
    :func:`atomic_dir`), put that result back. Returns what was removed. Leftovers of running processes, of other
    hosts or of unknown form are kept."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(.+)-(\d+)-[^-]*$")
    removed: list[Path] = []
    host = _host()
    for entry in sorted(final.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or match.group(2) != host or _alive(int(match.group(3))):
            continue
        if match.group(1) == "old" and not final.exists() and entry.is_dir():
            with contextlib.suppress(OSError):
                os.replace(entry, final)
            continue  # put back; where that failed, kept as it is rather than lost
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_permissions(directory: Path) -> None:
    """mkdtemp makes private directories; give a result the permissions of a normally created one."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON (values JSON cannot hold are written as their ``str``)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


#: errno values of a failed read or write that the user can fix: a full disk, a quota, a read-only file system, a
#: file or directory without permission.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_errno(exc: BaseException) -> int | None:
    """The errno behind an I/O failure: an :class:`OSError`'s, or the one safetensors' Rust writer puts in its
    message (``... No space left on device (os error 28)``); None when ``exc`` is no I/O failure."""
    if isinstance(exc, OSError):
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


def os_error(exc: BaseException) -> AttnscanError | None:
    """An I/O failure the user can fix (full disk, permissions) as a one-line user error; None for the others."""
    code = os_errno(exc)
    if code not in USER_OS_ERRORS:
        return None
    filename = getattr(exc, "filename", None)
    where = f": {filename}" if filename else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "the result was not saved; free some space (or choose another output directory) and run again"
    else:
        fix = "check the permissions, or choose another path"
    return AttnscanError(f"{os.strerror(code)}{where}: {fix}")


def now_utc() -> str:
    """The time now, UTC, to the second, ISO 8601: the ``started`` / ``finished`` stamps of every manifest."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def reading(path: Path, what: str, fix: str) -> Iterator[None]:
    """Turn any failure while reading ``path`` (a ``what``, e.g. "results bundle") into one :class:`AttnscanError`
    line naming the path, the failure and ``fix``. A damaged file fails its readers with any exception type
    (safetensors' own, pandas', ``KeyError`` for a missing entry, ``ValueError`` for a wrong shape), so every reader
    of files attnscan wrote, which may be truncated, garbled or from another version, runs under this."""
    try:
        yield
    except AttnscanError:
        raise
    except Exception as exc:  # see the docstring: any type may come out of a reader given damaged bytes
        text = " ".join(str(exc).split())
        reason = f"{type(exc).__name__}: {text[:150]}" if text else type(exc).__name__
        raise AttnscanError(f"{path} is not a readable {what}, it is damaged or incomplete ({reason}): {fix}") from None


def read_format_json(path: Path, fmt: str, version: int, what: str, fix: str) -> dict[str, Any]:
    """The JSON document at ``path`` when it is an object tagged ``format: fmt`` with ``format_version: version``;
    else one :class:`AttnscanError` line naming the file (``what``: the kind of file, ``fix``: what to do about an
    other version). The file must exist: callers say first what is missing."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AttnscanError(f"{path} is not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise AttnscanError(f"{path} is not an attnscan {what} file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise AttnscanError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise AttnscanError(f"{path} is not an attnscan {what} file")
    if doc.get("format_version") != version:
        raise AttnscanError(
            f"{path} has {what} format version {doc.get('format_version')}; this attnscan reads version {version}: "
            f"{fix}"
        )
    return doc
