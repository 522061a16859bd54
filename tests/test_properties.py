"""Property tests of the parsers (hypothesis): whatever text or bytes they are given, they return a well-formed value
or raise :class:`AttnscanError`, never anything else. Layer selections, ``--max-memory`` maps, prompt files of every
supported format, and results bundles and detector directories with random damage (read through
:func:`attnscan.rundir.load_bundles`, which reads bundles with :meth:`ScanResult.load`, and
:func:`attnscan.detect.store.load_trained`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnscan.analysis.result import ScanResult
from attnscan.detect.store import load_detector, load_trained
from attnscan.errors import AttnscanError
from attnscan.models.loading import parse_layers, parse_max_memory
from attnscan.prompts.loaders import READERS, read_file_rows
from attnscan.rundir import load_bundles
from faults_world import saved_results

T = TypeVar("T")


def attempt(call: Callable[[], T]) -> T | None:
    """``call()``, or None when it raised the user error; anything else propagates and fails the property."""
    try:
        return call()
    except AttnscanError:
        return None


FEW = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SOME = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

LAYER_TEXT = st.text(alphabet="0123456789-,; al x", max_size=24) | st.text(max_size=12)


@FEW
@given(text=LAYER_TEXT, n_layers=st.integers(1, 40))
def test_a_layer_selection_is_valid_layers_or_a_user_error(text: str, n_layers: int) -> None:
    layers = attempt(lambda: parse_layers(text, n_layers))
    assert layers is None or (layers and list(layers) == sorted(set(layers)) and all(0 <= x < n_layers for x in layers))


@FEW
@given(chosen=st.lists(st.integers(-40, 39), min_size=1, max_size=8), n_layers=st.integers(1, 40))
def test_written_layers_read_back(chosen: list[int], n_layers: int) -> None:
    text = ",".join(str(x) for x in chosen)
    if all(-n_layers <= x < n_layers for x in chosen):
        assert parse_layers(text, n_layers) == tuple(sorted({x % n_layers for x in chosen}))
    else:
        with pytest.raises(AttnscanError, match="out of range"):
            parse_layers(text, n_layers)


@FEW
@given(low=st.integers(0, 10**12), high=st.integers(0, 10**12))
def test_a_span_is_refused_before_it_is_spelled_out(low: int, high: int) -> None:
    n_layers = 30
    if low <= high < n_layers:
        assert parse_layers(f"{low}-{high}", n_layers) == tuple(range(low, high + 1))
    else:
        with pytest.raises(AttnscanError):
            parse_layers(f"{low}-{high}", n_layers)


MEMORY_TEXT = st.text(alphabet="0123456789=,.:cpudiskGgMKiBb x", max_size=30) | st.text(max_size=15)


@FEW
@given(text=MEMORY_TEXT)
def test_a_memory_map_is_devices_and_sizes_or_a_user_error(text: str) -> None:
    from accelerate.utils import convert_file_size_to_int

    parsed = attempt(lambda: parse_max_memory(text))
    for device, size in (parsed or {}).items():
        assert isinstance(device, int) or (isinstance(device, str) and device.strip() == device and device)
        assert convert_file_size_to_int(size) >= 0  # what accelerate will do with it


@FEW
@given(sizes=st.dictionaries(st.integers(0, 7) | st.sampled_from(["cpu", "disk"]), st.integers(1, 999), min_size=1))
def test_written_memory_maps_read_back(sizes: dict[Any, int]) -> None:
    text = ",".join(f"{device}={n}GiB" for device, n in sizes.items())
    assert parse_max_memory(text) == {device: f"{n}GiB" for device, n in sizes.items()}


# ------------------------------------------------------------------------------------------------ prompt files

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["prompt", "text", "x"]), inner),
    max_leaves=12,
)


def _check_rows(path: Path) -> None:
    rows = attempt(lambda: read_file_rows(path))
    if rows is not None:
        texts, groups = rows
        assert all(isinstance(t, str) for t in texts) and len(groups) == len(texts)


@SOME
@given(suffix=st.sampled_from(sorted(READERS)), body=st.binary(max_size=300))
def test_any_bytes_in_a_prompt_file_read_or_are_refused(suffix: str, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prompts{suffix}"
        path.write_bytes(body)
        _check_rows(path)


@SOME
@given(suffix=st.sampled_from(sorted(READERS)), text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_text_in_a_prompt_file_reads_or_is_refused(suffix: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prompts{suffix}"
        path.write_text(text, encoding="utf-8")
        _check_rows(path)


@SOME
@given(value=JSON_VALUES)
def test_any_json_document_reads_or_is_refused(value: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.json"
        path.write_text(json.dumps(value), encoding="utf-8")
        _check_rows(path)
        lines = Path(tmp) / "prompts.jsonl"
        lines.write_text("\n".join(json.dumps(v) for v in (value if isinstance(value, list) else [value])))
        _check_rows(lines)


@SOME
@given(rows=st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=3), max_size=5), tsv=st.booleans())
def test_any_table_reads_or_is_refused(rows: list[list[str]], tsv: bool) -> None:
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("prompts.tsv" if tsv else "prompts.csv")
        with path.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, delimiter="\t" if tsv else ",").writerows(rows)
        _check_rows(path)


# ------------------------------------------------------------------------------------- bundles and detectors

DAMAGE = st.sampled_from(["truncate", "flip", "delete", "replace", "empty"])


@pytest.fixture(scope="module")
def saved(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A results bundle and a detector directory of the tiny model, written once."""
    return saved_results(tmp_path_factory, tiny_model_dir)


def _damage(root: Path, data: st.DataObject) -> str:
    """Damage one file under ``root`` the way a failed copy or disk does; returns what was done, for the report."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    kind = data.draw(DAMAGE)
    body = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(body[: data.draw(st.integers(0, max(len(body) - 1, 0)))])
    elif kind == "flip":
        raw = bytearray(body)
        for _ in range(data.draw(st.integers(1, 8))):
            if raw:
                raw[data.draw(st.integers(0, min(len(raw) - 1, 4095)))] = data.draw(st.integers(0, 255))
        target.write_bytes(bytes(raw))
    elif kind == "delete":
        target.unlink()
    elif kind == "replace":
        target.write_bytes(data.draw(st.binary(max_size=200)))
    else:
        target.write_bytes(b"")
    return f"{kind} {target.relative_to(root)}"


def _reads_or_refuses(source: Path, read: Callable[[Path], object], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy)
        what = _damage(copy, data)
        try:
            attempt(lambda: read(copy))
        except Exception as exc:  # the property: nothing but the user error may come out
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc


@SOME
@given(data=st.data())
def test_a_damaged_bundle_loads_or_is_refused(saved: dict[str, Path], data: st.DataObject) -> None:
    _reads_or_refuses(saved["bundle"], lambda p: load_bundles([p]), data)
    _reads_or_refuses(saved["bundle"], ScanResult.load, data)  # the library's own reader, unguarded by rundir


@SOME
@given(data=st.data())
def test_a_damaged_detector_loads_or_is_refused(saved: dict[str, Path], data: st.DataObject) -> None:
    _reads_or_refuses(saved["detector"], load_trained, data)
    _reads_or_refuses(saved["detector"], load_detector, data)  # the reader of one kind's directory
