"""The HTML report: one self-contained file, provenance and observations, escaping of untrusted text, the embedded
data and the atomic write (no browser; see test_report_browser.py for the page itself, test_digest.py for the data
and the map encoding)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import sys
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from report_data import (
    BENIGN,
    BENIGN_LENGTHS,
    EVIL_SPEC,
    EVIL_TOKEN,
    GGUF_SHA,
    IMG_INJECTION,
    INJECTED_PROMPT,
    JAILBREAK,
    JAILBREAK_LENGTHS,
    SCRIPT_INJECTION,
)

from attnscan import AttnscanError
from attnscan.views.digest import build_digest
from attnscan.views.page import _page_assets, render_html
from attnscan.views.report import build_report, write_report

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib


@pytest.fixture
def page(inputs: dict[str, Any]) -> str:
    """Rendered for each test (in about 20 ms), with the page's assets read anew: a page rendered once per module
    would be credited by mutmut to the first test that asked for it, and no other test would run against a
    mutant of the page."""
    _page_assets.cache_clear()
    return build_report(**inputs)


def data_json(page: str) -> str:
    match = re.search(r"<script type='application/json' id='attnscan-data'>(.*?)</script>", page, re.S)
    assert match is not None
    return match.group(1)


def test_one_self_contained_file(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<script") == 2  # the JSON data and the page's own inline script, nothing else
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(
        r"<(?:link|img|iframe|embed|object|source|audio|video)\b[^>]*\b(?:src|href)\s*=\s*['\"]?\s*"
        r"(?:https?:)?//",
        page,
        re.I,
    )
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?\s*(?:https?:)?//", page, re.I)
    assert "@import" not in page and "url(" not in page
    # Only a data: favicon among links, and a CSP that allows nothing from the network.
    assert re.findall(r"<link[^>]*>", page) == ["<link rel='icon' href='data:,'>"]
    assert "default-src 'none'" in html.unescape(page)


def test_assets_ship_with_the_package_and_are_inlined(page: str) -> None:
    assets = resources.files("attnscan.views") / "assets"
    script = (assets / "report.js").read_text(encoding="utf-8")
    style = (assets / "report.css").read_text(encoding="utf-8")
    assert "attnscan-data" in script and "#profile-svg" in style
    # The page's script element is the asset verbatim, and its style element starts with the style sheet.
    assert page.rsplit("<script>", 1)[1].split("</script>", 1)[0] == "\n" + script
    assert page.split("<style>", 1)[1].split("</style>", 1)[0].startswith("\n" + style)
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert re.findall(r"<link[^>]*>", page) == ["<link rel='icon' href='data:,'>"]
    # Neither file can end its own element early once inlined.
    assert "</script" not in script.lower() and "</style" not in style.lower()
    # Every asset matches a package-data pattern of pyproject.toml, so the wheel carries it.
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["attnscan.views"]
    names = sorted(f"assets/{p.name}" for p in assets.iterdir() if p.is_file())
    assert {"assets/report.css", "assets/report.js"} <= set(names)
    assert all(any(fnmatch(name, pat) for pat in patterns) for name in names)


def test_csp_allows_exactly_the_inline_script_and_style(page: str) -> None:
    csp = re.search(r"http-equiv='Content-Security-Policy' content=\"([^\"]*)\"", page)
    assert csp is not None
    script = page.rsplit("<script>", 1)[1].split("</script>", 1)[0]
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    for source in (script, style):
        digest = base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")
        assert f"'sha256-{digest}'" in html.unescape(csp.group(1))
    assert "unsafe-inline" not in csp.group(1)


def test_provenance_and_observations_are_shown(page: str, inputs: dict[str, Any]) -> None:
    result = inputs["results"]["tiny"]
    assert GGUF_SHA in page
    for info in result.manifest["prompt_sets"].values():
        assert info["sha256"] in page
    assert "<dt>Grid length T</dt><dd>32</dd>" in page
    assert "<dt>Alignment</dt><dd>absolute</dd>" in page
    assert "<dt>Captured layers</dt><dd>0, 2, 5 (3)</dd>" in page
    assert "2026-01-02T03:04:05+00:00" in page and "transformers 5.x" in page
    assert html.escape(EVIL_SPEC, quote=True) in page
    for sentence in inputs["observations"]:
        assert f"<li>{html.escape(sentence, quote=True)}</li>" in page
    assert "Layer 2" in page  # the planted layer is named in the observations


def test_untrusted_strings_are_only_ever_escaped(page: str) -> None:
    lowered = page.lower()
    assert "<script>alert" not in lowered
    assert "<img" not in lowered
    assert "<svg onload" not in lowered and "<b>" not in lowered and "<i>" not in lowered
    assert 'onerror="' not in lowered
    # The prompt is visible as text in the browser.
    assert html.escape(SCRIPT_INJECTION, quote=True) in page
    assert html.escape(IMG_INJECTION, quote=True) in page
    assert html.escape("Report <i>title</i>", quote=True) in page


def test_data_json_parses_back_and_cannot_close_its_script(page: str, inputs: dict[str, Any]) -> None:
    raw = data_json(page)
    for char in ("<", ">", "&", "\u2028", "\u2029"):
        assert char not in raw
    data = json.loads(raw)
    assert data == build_digest(**inputs)
    assert data["format"] == "attnscan-report"
    assert data["models"][0]["tokens"][1] == EVIL_TOKEN
    example = data["prompts"][1]["examples"][0]
    assert example["text"] == INJECTED_PROMPT
    assert example["tokens"] == {"tiny": JAILBREAK_LENGTHS[0]}
    # The digest renders to the same page.
    assert render_html(data) == page


def test_prompt_browser_shows_examples_with_token_counts(page: str) -> None:
    assert "benign — 6 of 6 prompts" in page
    assert "jailbreak — 6 of 6 prompts" in page
    for text, n in zip(BENIGN, BENIGN_LENGTHS, strict=True):
        assert f"<td data-v='{n}'>{n}</td><td class='prompt l'><div class='ptext'>{html.escape(text)}" in page
    assert "do not match the sha256" not in page


def test_prompts_that_do_not_match_the_manifest_are_flagged(inputs: dict[str, Any]) -> None:
    changed = {**inputs, "prompts": {"tiny": {"benign": ["something else"], "jailbreak": list(JAILBREAK)}}}
    assert "do not match the sha256 recorded for set 'benign' by tiny" in build_report(**changed)


def test_bad_keys_and_arguments_raise(inputs: dict[str, Any]) -> None:
    with pytest.raises(AttnscanError, match="prompts names model 'benign'"):
        build_report(**{**inputs, "prompts": {"benign": {"benign": ["x"]}}})
    with pytest.raises(AttnscanError, match="tables names model 'other'"):
        build_report(**{**inputs, "tables": {"other": pd.DataFrame()}})
    with pytest.raises(AttnscanError, match="no results"):
        build_report({}, {}, [])
    with pytest.raises(AttnscanError, match="display_size"):
        build_report(**inputs, display_size=2)


def test_result_without_table_or_prompts(inputs: dict[str, Any]) -> None:
    page = build_report(inputs["results"], {}, [])
    assert "No layer table for tiny" in page and "No prompt texts were given" in page
    assert "No observations were given" in page


def test_write_report_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> None:
    target = tmp_path / "report.html"
    assert write_report(target, page) == target
    assert target.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(target, "<p>new</p>")
    assert target.read_text(encoding="utf-8") == page  # the old report is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # and no temporary file is left
    monkeypatch.undo()
    with pytest.raises(AttnscanError, match="does not exist"):
        write_report(tmp_path / "missing" / "report.html", page)
    with pytest.raises(AttnscanError, match="is a directory"):
        write_report(tmp_path, page)


def _detection(margin_low: float, probe_primary: bool = False) -> pd.DataFrame:
    """A detection.csv with the baseline columns; layer 1 is best; its margin interval starts at ``margin_low``."""
    frame = pd.DataFrame({"layer": [0, 1, 2], "cp_auroc": [0.7, 0.93, 0.8], "probe_auroc": [0.6, 0.9, 0.95]})
    frame["cp_auroc_low"], frame["cp_auroc_high"] = frame["cp_auroc"] - 0.05, frame["cp_auroc"] + 0.03
    frame["flagged"] = frame["cp_auroc"] >= 0.9
    frame["length_auroc"], frame["text_auroc"] = 0.66, 0.81
    frame["text_auroc_low"], frame["text_auroc_high"] = 0.74, 0.88
    primary = frame["probe_auroc"] if probe_primary else frame["cp_auroc"]
    frame["text_margin"] = primary - 0.81
    frame["text_margin_low"], frame["text_margin_high"] = frame["text_margin"] - 0.12 + margin_low, 0.2
    frame["text_margin_low"] = frame["text_margin_low"].where(frame["layer"] != 1, margin_low)
    return frame


def test_detection_section_shows_the_text_baseline_and_the_margin(inputs: dict[str, Any]) -> None:
    page = build_report(**{**inputs, "detection": {"tiny": _detection(0.02)}})
    section = page.split("<h3>Jailbreak detection per layer</h3>", 1)[1].split("</section>", 1)[0]
    assert section.count("class='baseline'") == 1 and "TF-IDF text baseline AUROC 0.810" in section
    assert "Baseline AUROCs on the same folds: prompt length alone 0.660, a TF-IDF text classifier 0.810" in section
    assert "The CP detector at layer 1 beats the text baseline by +0.120 AUROC (95% CI +0.020 to +0.200)." in section
    assert "minus text baseline +0.120 [+0.020, +0.200]" in section  # each point's tooltip carries its margin
    digest = json.loads(data_json(page))
    assert digest["models"][0]["detection_baseline"]["layer"] == 1
    assert digest["models"][0]["detection_baseline"]["text"] == pytest.approx(0.81)

    losing = build_report(**{**inputs, "detection": {"tiny": _detection(-0.05)}})
    assert "The CP detector at layer 1 does not beat the text baseline" in losing
    # a detector trained to flag with the probe: its margin, at its best layer
    probe = build_report(**{**inputs, "detection": {"tiny": _detection(0.01, probe_primary=True)}})
    assert "The probe detector at layer 2 " in probe
    # a detection table without baselines: no line, no sentence
    plain = _detection(0.0).drop(columns=[c for c in _detection(0.0).columns if "text" in c or "length" in c])
    without = build_report(**{**inputs, "detection": {"tiny": plain}})
    assert "class='baseline'" not in without and "Baseline AUROCs" not in without
    assert "no text baseline was computed" in without
