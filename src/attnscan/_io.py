"""Atomic output: results appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        old: Path | None = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
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
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
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


def now_utc() -> str:
    """The time now, UTC, to the second, ISO 8601: the ``started`` / ``finished`` stamps of every manifest."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_format_json(path: Path, fmt: str, version: int, what: str, fix: str) -> dict[str, Any]:
    """The JSON document at ``path`` when it is an object tagged ``format: fmt`` with ``format_version: version``;
    else one :class:`AttnscanError` line naming the file (``what``: the kind of file, ``fix``: what to do about an
    other version). The file must exist: callers say first what is missing."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AttnscanError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise AttnscanError(f"{path} is not an attnscan {what} file")
    if doc.get("format_version") != version:
        raise AttnscanError(
            f"{path} has {what} format version {doc.get('format_version')}; this attnscan reads version {version}: "
            f"{fix}"
        )
    return doc
