"""Atomic output: results appear complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AttnscanError

BUNDLE_MARKER = "manifest.json"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that cannot take a new bundle, before any work is done."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise AttnscanError(f"output path {out} exists and is not a directory: choose another --out")
    if (out / BUNDLE_MARKER).is_file():
        if not overwrite:
            raise AttnscanError(f"{out} already holds a results bundle: pass --overwrite or choose another --out")
        return
    if any(out.iterdir()):
        raise AttnscanError(f"{out} is not empty and holds no attnscan bundle: choose a new or empty --out")


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temporary directory (and any parent directories this call created) is removed and
    ``final`` is left as it was.
    """
    final = Path(final)
    check_output_dir(final, overwrite)
    created: list[Path] = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
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


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes private directories; give the bundle the permissions of a normally created one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
