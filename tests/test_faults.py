"""The catalogue of bad input: one table of command lines over damaged models, hostile prompt files, damaged bundles,
detectors and checkpoints, and impossible options. Each must end in exit code 2 with a single ``error:`` line that
says the expected words, no traceback, and nothing written where the output would have gone.

Add every newly found fault here as one row. The rows about results bundles expect only the bundle's name in the
message, so they hold for any bundle format version. Placeholders in a command line: ``{out}`` (a fresh output path;
``{out_html}``, ``{out_csv}``, ``{out_png}`` with those suffixes), ``{taken}`` (an existing file), ``{foreign}`` (a
non-empty directory attnscan did not write), ``{folder_html}`` (a directory named like a report), and the names of
the damaged inputs built by :mod:`faults_world` (``{m:NAME}`` models, ``{p:NAME}`` prompt files, ``{b:NAME}``
bundles, ``{d:NAME}`` detectors, ``{c:NAME}`` checkpoint directories).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from attnscan.cli.main import app
from attnscan.errors import AttnscanError
from attnscan.models.checks import check_gguf, check_model_dir
from faults_world import (
    damaged_copies,
    edit_json,
    flip_bytes,
    garble_json,
    model_files,
    prompt_files,
    saved_results,
    small_gguf,
    truncate,
)

runner = CliRunner()

SETS = ["--benign", "{p:benign_txt}", "--jailbreak", "{p:jail_txt}"]
DEV = ["--device", "cpu", "--quiet"]
FAST = ["--length", "16", *DEV]


def scan(model: str, *extra: str, sets: list[str] = SETS) -> list[str]:
    return ["scan", "--model", model, *sets, "--out", "{out}", *FAST, *extra]


def with_benign(source: str) -> list[str]:
    return scan("{m:good}", sets=["--benign", source, "--jailbreak", "{p:jail_txt}"])


CATALOGUE: list[tuple[str, list[str], str]] = [
    # damaged GGUF files
    ("gguf-random-bytes", scan("{m:gguf_random}"), "does not start with the GGUF magic bytes"),
    ("gguf-empty", scan("{m:gguf_empty}"), "gguf_empty.gguf is damaged or not a model file (it is empty)"),
    ("gguf-header-cut", scan("{m:gguf_header}"), "cut short or garbled"),
    ("gguf-tensor-data-cut", scan("{m:gguf_tensors_cut}"), "gguf_tensors_cut.gguf is damaged"),
    ("gguf-unknown-version", scan("{m:gguf_version}"), "GGUF version 99; attnscan reads versions 2 and 3"),
    ("gguf-no-tokenizer", scan("{m:gguf_valid_unusable}"), "use a GGUF file of a supported architecture"),
    ("gguf-cache-damaged", scan("{m:gguf_cache_damaged}"), "so that attnscan converts the GGUF file again"),
    ("gguf-missing", scan("{out}-missing.gguf"), "GGUF file not found"),
    # damaged safetensors model directories
    ("safetensors-cut-short", scan("{m:st_cut}"), "incomplete metadata, file not fully covered"),
    ("safetensors-header-cut", scan("{m:st_header}"), "model.safetensors is damaged or not a model file"),
    ("safetensors-random-bytes", scan("{m:st_random}"), "download or copy the model again"),
    ("safetensors-unknown-dtype", scan("{m:st_dtype}"), "model.safetensors is damaged"),
    ("safetensors-shard-missing", scan("{m:shard_missing}"), "names the shard model-00002-of-00002.safetensors"),
    ("pickle-weights-only", scan("{m:pickle_only}"), "--allow-pickle"),
    # config.json and tokenizer files
    ("config-half-written", scan("{m:cfg_json}"), "config.json is damaged or not a model file (invalid JSON"),
    ("config-not-an-object", scan("{m:cfg_list}"), "a JSON list, not an object"),
    ("config-without-model-type", scan("{m:cfg_no_type}"), "no model_type"),
    ("config-binary", scan("{m:cfg_binary}"), "not UTF-8 text"),
    ("config-unknown-model-type", scan("{m:cfg_unknown_type}"), "pass --trust-remote-code if the model ships"),
    ("tokenizer-garbage", scan("{m:tok_garbage}"), "cannot load the tokenizer"),
    ("tokenizer-missing", scan("{m:tok_missing}"), "restore its tokenizer files"),
    ("model-is-a-plain-file", scan("{m:plain_file}"), "cannot load model from file"),
    ("model-dir-without-config", scan("{m:no_config}"), "is a directory without config.json"),
    # prompt files
    ("prompts-binary", with_benign("{p:binary_txt}"), "is not valid UTF-8"),
    ("prompts-latin1", with_benign("{p:latin1_txt}"), "line 1 is not valid UTF-8: re-save the file as UTF-8"),
    ("prompts-utf16", with_benign("{p:utf16_txt}"), "is not valid UTF-8"),
    ("prompts-blank", with_benign("{p:empty_txt}"), "holds no prompts"),
    ("prompts-json-too-deep", with_benign("{p:deep_json}"), "nests JSON lists or objects too deeply"),
    ("prompts-json-numbers", with_benign("{p:numbers_json}"), "give a list of strings or a list of objects"),
    ("prompts-json-object", with_benign("{p:object_json}"), "expected a list of prompts"),
    ("prompts-json-cut", with_benign("{p:broken_json}"), "is not valid JSON"),
    ("prompts-jsonl-bad-line", with_benign("{p:broken_jsonl}"), "line 2 is not valid JSON"),
    ("prompts-parquet-garbage", with_benign("{p:random_parquet}"), "is not a readable parquet file"),
    ("prompts-csv-no-prompt-column", with_benign("{p:nocol_csv}"), "pass --field NAME"),
    ("prompts-csv-huge-field", with_benign("{p:huge_csv}"), "field larger than field limit"),
    ("prompts-unsupported-kind", with_benign("{p:prompts_pdf}"), "unsupported extension '.pdf'"),
    ("prompts-directory", with_benign("{p:directory_txt}"), "folder.txt"),
    ("prompts-missing", with_benign("{out}-missing.txt"), "prompt file not found"),
    # option values and output paths
    ("layers-unreadable", scan("{m:good}", "--layers", "1;2"), "cannot read layer '1;2'"),
    ("layers-out-of-range", scan("{m:good}", "--layers", "0,9"), "layer 9 out of range: model has 3 layers"),
    ("max-memory-unreadable", scan("{m:good}", "--device-map", "auto", "--max-memory", "lots"), "--max-memory"),
    ("dtype-unknown", scan("{m:good}", "--dtype", "float8"), "unknown dtype 'float8'"),
    ("out-is-a-file", [*scan("{m:good}"), "--out", "{taken}"], "exists and is not a directory"),
    ("out-is-foreign", [*scan("{m:good}"), "--out", "{foreign}"], "holds no attnscan"),
    # checkpoints
    ("checkpoint-is-a-file", scan("{m:good}", "--checkpoint", "{taken}"), "is a file: give --checkpoint a directory"),
    ("checkpoint-damaged", scan("{m:good}", "--resume", "--checkpoint", "{c:garbage}"), "cannot read checkpoint"),
    ("checkpoint-foreign", scan("{m:good}", "--resume", "--checkpoint", "{c:foreign}"), "not an attnscan checkpoint"),
    ("checkpoint-other-settings", scan("{m:good}", "--resume", "--checkpoint", "{c:other}"), "different settings"),
    # results bundles
    ("bundle-without-manifest", ["report", "{b:no_manifest}", "--out", "{out_html}"], "no manifest.json"),
    ("bundle-manifest-cut", ["report", "{b:manifest_cut}", "--out", "{out_html}"], "manifest.json"),
    ("bundle-manifest-list", ["report", "{b:manifest_list}", "--out", "{out_html}"], "not an attnscan manifest"),
    ("bundle-no-layers-key", ["report", "{b:manifest_no_layers}", "--out", "{out_html}"], "bundle_manifest_no_layers"),
    ("bundle-format-future", ["report", "{b:format_future}", "--out", "{out_html}"], "format 99"),
    ("bundle-accumulators-cut", ["report", "{b:acc_cut}", "--out", "{out_html}"], "bundle_acc_cut"),
    ("bundle-accumulators-gone", ["report", "{b:acc_gone}", "--out", "{out_html}"], "bundle_acc_gone"),
    ("bundle-accumulators-header", ["figure", "{b:acc_header}", "--out", "{out_png}"], "bundle_acc_header"),
    ("run-dir-bundle-missing", ["report", "{b:run_missing}", "--out", "{out_html}"], "gone is not an attnscan results"),
    ("report-out-is-a-dir", ["report", "{b:good}", "--out", "{folder_html}"], "it is a directory; give a file name"),
    (
        "defend-from-scan-binary-layers",
        ["defend", "--model", "{m:good}", *SETS, "--from-scan", "{b:layers_binary}", "--out", "{out}", *DEV],
        "layers.csv",
    ),
    # detectors
    (
        "detector-json-cut",
        ["detect", "score", "{d:meta_cut}", "--prompts", "{p:jail_txt}", "--out", "{out_csv}", *DEV],
        "detector.json is not valid JSON",
    ),
    (
        "detector-version",
        ["detect", "score", "{d:meta_version}", "--prompts", "{p:jail_txt}", "--out", "{out_csv}", *DEV],
        "format version 99",
    ),
    (
        "detector-state-cut",
        ["detect", "score", "{d:state_cut}", "--prompts", "{p:jail_txt}", "--out", "{out_csv}", *DEV],
        "detector.safetensors cannot be read",
    ),
    ("detector-probe-gone", ["detect", "eval", "{d:probe_gone}", *SETS, *DEV], "lacks probe"),
    (
        "detector-table-binary",
        ["detect", "eval", "{d:table_binary}", *SETS, "--out", "{out_csv}", *DEV],
        "detection.csv",
    ),
    (
        "detector-missing",
        ["detect", "score", "{out}-none", "--prompts", "{p:jail_txt}", "--out", "{out_csv}", *DEV],
        "detector directory not found",
    ),
    (
        "detect-train-damaged-model",
        ["detect", "train", "--model", "{m:st_cut}", *SETS, "--out", "{out}", *FAST],
        "file not fully covered",
    ),
    (
        "defend-from-damaged-detector",
        ["defend", "--model", "{m:good}", *SETS, "--from-detector", "{d:table_binary}", "--out", "{out}", *DEV],
        "detection.csv",
    ),
    # the other commands on damaged input
    ("run-damaged-gguf", ["run", "--model", "{m:gguf_random}", *SETS, "--out", "{out}", *FAST], "GGUF magic bytes"),
    ("behave-damaged-model", ["behave", "--model", "{m:cfg_json}", *SETS, "--out", "{out}", "--quiet"], "config.json"),
    (
        "behave-binary-refusal-phrases",
        ["behave", "--model", "{m:good}", *SETS, "--refusal-phrases", "{p:binary_txt}", "--out", "{out}", "--quiet"],
        "binary.txt",
    ),
    (
        "defend-damaged-model",
        ["defend", "--model", "{m:tok_garbage}", *SETS, "--layers", "1", "--out", "{out}", "--quiet"],
        "cannot load the tokenizer",
    ),
    ("study-damaged-gguf", ["study", "--model", "{m:gguf_header}", "--out", "{out}", "--quiet"], "gguf_header.gguf"),
    ("fetch-unknown", ["fetch", "no-such-model"], "unknown model to fetch 'no-such-model'"),
    ("fetched-wrong-size", scan("qwen2.5-coder-0.5b-instruct"), "delete it and run 'attnscan fetch"),
]


def _bundles(root: Path, good: Path) -> dict[str, Path]:
    kinds: dict[str, Any] = {
        "no_manifest": lambda d: (d / "manifest.json").unlink(),
        "manifest_cut": lambda d: garble_json(d / "manifest.json"),
        "manifest_list": lambda d: (d / "manifest.json").write_text("[]"),
        "manifest_no_layers": lambda d: edit_json(d / "manifest.json", layers=None),
        "format_future": lambda d: edit_json(d / "manifest.json", bundle_format=99),
        "acc_cut": lambda d: truncate(d / "accumulators.safetensors", -200),
        "acc_gone": lambda d: (d / "accumulators.safetensors").unlink(),
        "acc_header": lambda d: flip_bytes(d / "accumulators.safetensors", random.Random(2), 16, start=8, stop=200),
        "layers_binary": lambda d: (d / "layers.csv").write_bytes(bytes(range(256)) * 4),
    }
    out = damaged_copies(good, root, {f"bundle_{k}": v for k, v in kinds.items()})
    found = {k.removeprefix("bundle_"): v for k, v in out.items()}
    run = root / "run_missing"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"kind": "attnscan-run", "models": {"m": {"bundle": "gone"}}}))
    found["run_missing"] = run
    found["good"] = good
    return found


def _detectors(root: Path, good: Path) -> dict[str, Path]:
    kinds: dict[str, Any] = {
        "meta_cut": lambda d: garble_json(d / "detector.json"),
        "meta_version": lambda d: edit_json(d / "detector.json", format_version=99),
        "state_cut": lambda d: truncate(d / "detector.safetensors", 30),
        "probe_gone": lambda d: shutil.rmtree(d / "probe"),
        "table_binary": lambda d: (d / "detection.csv").write_bytes(b"\x00\xff" * 500),
    }
    return damaged_copies(good, root, kinds)


def _checkpoints(root: Path) -> dict[str, Path]:
    out = {name: root / f"ckpt_{name}" for name in ("garbage", "foreign", "other")}
    for path in out.values():
        path.mkdir()
    (out["garbage"] / "rank0.safetensors").write_bytes(random.Random(3).randbytes(999))
    save_file({"x": torch.zeros(2)}, str(out["foreign"] / "rank0.safetensors"))
    meta = {"format": "attnscan-checkpoint", "settings": json.dumps({"length": 999})}
    save_file({"x": torch.zeros(2)}, str(out["other"] / "rank0.safetensors"), metadata=meta)
    return out


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every damaged input of the catalogue, by placeholder (``m:NAME``, ``p:NAME``, ...), built once."""
    root = tmp_path_factory.mktemp("faults")
    places: dict[str, Path] = {"m:good": tiny_model_dir}
    models = root / "models"
    models.mkdir()
    places.update({f"m:{k}": v for k, v in model_files(models, tiny_model_dir).items()})
    prompts = root / "prompts"
    prompts.mkdir()
    places.update({f"p:{k}": v for k, v in prompt_files(prompts).items()})
    saved = saved_results(tmp_path_factory, tiny_model_dir)
    for kind, built in (("b", _bundles(root / "bundles", saved["bundle"])), ("d", _detectors(root, saved["detector"]))):
        places.update({f"{kind}:{k}": v for k, v in built.items()})
    places.update({f"c:{k}": v for k, v in _checkpoints(root).items()})
    cache = root / "cache"
    (cache / "fetched").mkdir(parents=True)
    from attnscan.models.fetched import FETCHED
    from attnscan.models.gguf_cache import sha256_file

    (cache / "fetched" / f"{FETCHED['qwen2.5-coder-0.5b-instruct'].sha256}.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    cached = small_gguf(models / "cached.gguf", fill=2.0)  # its conversion in the cache is damaged
    converted = shutil.copytree(places["m:st_cut"], cache / "gguf" / sha256_file(cached))
    (converted / "attnscan-source.json").write_text("{}")
    places["m:gguf_cache_damaged"] = cached
    places["cache"] = cache
    return places


def _fill(args: list[str], world: dict[str, Path], area: Path) -> list[str]:
    names = {
        "out": area / "out",
        "out_html": area / "out.html",
        "out_csv": area / "out.csv",
        "out_png": area / "out.png",
        "taken": area / "taken",
        "foreign": area / "foreign",
        "folder_html": area / "folder.html",
    }
    table = {**{k: str(v) for k, v in world.items()}, **{k: str(v) for k, v in names.items()}}
    return [re.sub(r"\{([a-z]:\w+|\w+)\}", lambda m: table[m.group(1)], arg) for arg in args]


def _snapshot(area: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(area)): (p.read_bytes() if p.is_file() else None) for p in sorted(area.rglob("*"))}


def test_the_catalogue_is_large_and_its_names_unique() -> None:
    names = [name for name, _, _ in CATALOGUE]
    assert len(names) >= 40 and len(set(names)) == len(names)
    commands = {args[0] if args[0] != "detect" else f"detect {args[1]}" for _, args, _ in CATALOGUE}
    wanted = {"scan", "run", "report", "figure", "behave", "defend", "study", "fetch", "detect train"}
    assert wanted | {"detect score", "detect eval"} <= commands


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_error_line_and_writes_nothing(
    args: list[str], words: str, world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNSCAN_CACHE", str(world["cache"]))
    area = tmp_path / "area"
    area.mkdir()
    (area / "taken").write_text("someone's file\n")
    (area / "foreign").mkdir()
    (area / "foreign" / "notes.txt").write_text("not attnscan's\n")
    (area / "folder.html").mkdir()
    before = _snapshot(area)
    res = runner.invoke(app, _fill(args, world, area))
    detail = (res.stdout, res.stderr, repr(res.exception))
    assert res.exit_code == 2, detail
    lines = res.stderr.strip().splitlines()
    err = lines[-1] if lines else ""
    assert err.startswith("error: ") and all(line.startswith("warning: ") for line in lines[:-1]), detail
    assert "Traceback" not in res.stdout + res.stderr, detail
    assert _fill([words], world, area)[0] in err, detail
    assert _snapshot(area) == before, "the failed command left something in the output area"


# ----------------------------------------------------------------------- the model file checks on their own


def test_a_sound_gguf_and_model_directory_pass(tmp_path: Path, tiny_model_dir: Path) -> None:
    check_gguf(small_gguf(tmp_path / "ok.gguf"))
    check_model_dir(tiny_model_dir)
    sharded = shutil.copytree(tiny_model_dir, tmp_path / "sharded")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    check_model_dir(sharded)


@pytest.mark.parametrize("keep", [4, 8, 24, 100, -1, -64])
def test_a_gguf_cut_anywhere_is_refused_by_name(tmp_path: Path, keep: int) -> None:
    path = small_gguf(tmp_path / "cut.gguf")
    truncate(path, keep)
    with pytest.raises(AttnscanError, match=r"cut\.gguf is damaged or not a model file") as info:
        check_gguf(path)
    assert "download or copy the model again" in str(info.value)


def test_a_model_directory_cut_short_is_refused_with_the_fix(tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    truncate(copy / "model.safetensors", -1)
    with pytest.raises(AttnscanError, match=r"model\.safetensors is damaged .* download or copy the model again"):
        check_model_dir(copy)
    with pytest.raises(AttnscanError, match="delete the cache"):
        check_model_dir(copy, "delete the cache")
