"""Every user-controlled string that reaches the report (model labels, set names, prompt texts, tokens, title,
observations, manifest fields) stays text: the page is parsed with the standard library's HTML parser, and a page
built with injection markers must have exactly the element structure of a page built with harmless placeholders in
the same places, with each marker readable as text."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from typing import Any

import pandas as pd
from report_data import BENIGN, BENIGN_LENGTHS, JAILBREAK, JAILBREAK_LENGTHS, make_manifest, make_set

from attnscan import PromptSet, ScanResult
from attnscan.analysis.statistics import NO_SHIFT, layer_table
from attnscan.views.report import build_report

MARKUP = (
    "<script>alert({i})</script>",
    '"><img src=x onerror=alert({i})>',
    "'><svg onload=alert({i})>",
    "</textarea></title><b id=x{i}>bold</b><!--",
    "&lt;i&gt;{i}&amp;",
)
PLACES = (
    "label",
    "set",
    "prompt",
    "token",
    "title",
    "observation",
    "spec",
    "source",
    "device",
    "command",
    "model_type",
)


def markers(evil: bool) -> dict[str, str]:
    """One string per place: an injection marker, or a harmless placeholder of the same role."""
    return {
        place: (MARKUP[i % len(MARKUP)].format(i=i) + f" {place}" if evil else f"placeholder {place}")
        for i, place in enumerate(PLACES)
    }


def build(evil: bool) -> str:
    m = markers(evil)
    sets = {
        "benign": make_set("benign", BENIGN_LENGTHS, 1),
        "jailbreak": make_set("jailbreak", JAILBREAK_LENGTHS, 2, shift=1.0),
        m["set"]: make_set(m["set"], BENIGN_LENGTHS, 3),
    }
    manifest = make_manifest(BENIGN, (m["prompt"], *JAILBREAK[1:]))
    third = PromptSet(m["set"], BENIGN, m["source"])
    manifest["prompt_sets"][m["set"]] = {**third.provenance(), "tokens_min": 5, "tokens_max": 12, "truncated": 0}
    manifest["prompt_sets"]["jailbreak"]["source"] = m["source"]
    manifest["model"]["spec"] = m["spec"]
    manifest["device"] = m["device"]
    manifest["command_line"] = ["attnscan", "run", m["command"]]
    manifest["architecture"]["model_type"] = m["model_type"]
    result = ScanResult(sets, manifest)
    table = layer_table(result, n_permutations=50, n_bootstrap=50)
    detection = pd.DataFrame({"layer": [0, 2, 5], "cp_auroc": [0.7, 0.9, 0.8], "probe_auroc": [0.6, 0.8, 0.9]})
    label = m["label"]
    prompts = {"benign": list(BENIGN), "jailbreak": [m["prompt"], *JAILBREAK[1:]], m["set"]: list(BENIGN)}
    return build_report(
        results={label: result},
        tables={label: table},
        observations=[m["observation"]],
        prompts={label: prompts},
        tokens={label: ["<s>", m["token"]]},
        title=m["title"],
        generated="2026-01-02T03:06:07+00:00",
        detection={label: detection},
    )


class Page(HTMLParser):
    """The element structure (tags with their attribute names), the text outside scripts and styles, the attribute
    values, and the JSON data of the page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.structure: list[tuple[str, str, tuple[str, ...]]] = []
        self.text: list[str] = []
        self.values: list[str] = []
        self.json: list[str] = []
        self._inside: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.structure.append(("start", tag, tuple(name for name, _ in attrs)))
        self.values += [value or "" for _, value in attrs]
        self._inside.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.structure.append(("empty", tag, tuple(name for name, _ in attrs)))
        self.values += [value or "" for _, value in attrs]

    def handle_endtag(self, tag: str) -> None:
        self.structure.append(("end", tag, ()))
        while self._inside and self._inside.pop()[0] != tag:
            pass

    def handle_comment(self, data: str) -> None:
        self.structure.append(("comment", "", ()))

    def handle_data(self, data: str) -> None:
        tag, attrs = self._inside[-1] if self._inside else ("", {})
        if tag == "script" and attrs.get("id") == "attnscan-data":
            self.json.append(data)
        elif tag not in ("script", "style"):
            self.text.append(data)


def test_injected_markers_stay_text() -> None:
    clean, evil = Page(build(False)), Page(build(True))
    assert evil.structure == clean.structure
    text, values = "".join(evil.text), "\n".join(evil.values)
    data = json.loads("".join(evil.json))
    flat = json.dumps(data, ensure_ascii=False)
    for place, marker in markers(True).items():
        # each marker is readable as text somewhere on the page (the JSON keeps it for the script's textContent)
        assert marker in text or marker in values or json.dumps(marker, ensure_ascii=False)[1:-1] in flat, place
    for place in ("label", "set", "prompt", "title", "observation", "spec", "source"):
        assert markers(True)[place] in text, place  # shown by the page itself, not only through the script
    assert clean.structure.count(("start", "script", ())) == 1


class Tables(HTMLParser):
    """Every ``<table>`` of a page: its attributes, header cells and rows (attributes and ``(text, data-v)`` cells)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict[str, Any]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": a, "head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"attrs": a, "cells": []})
        elif tag in ("th", "td") and self.tables:
            self._cell = []
            self._cell_attrs = a

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell)
            if tag == "th":
                self.tables[-1]["head"].append(text)
            else:
                self.tables[-1]["rows"][-1]["cells"].append((text, self._cell_attrs.get("data-v")))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def shown(value: float, kind: str) -> str:
    """How the page writes a number of the verdict table (the page's documented formats)."""
    if kind == "signed":
        return f"{value:+.3f}".replace("-", "\u2212")
    if kind == "q":
        return f"{value:.2g}"
    if kind == "pct":
        return f"{value:.0%}"
    return f"{value:.4f}"


def test_the_verdict_table_shows_every_layer_of_the_layer_table(inputs: dict[str, Any]) -> None:
    page = build_report(**inputs)
    frame = inputs["tables"]["tiny"]
    tables = [t for t in Tables(page).tables if t["attrs"].get("class") == "sortable data"]
    assert len(tables) == 1 and tables[0]["attrs"]["data-model"] == "0"
    table = tables[0]
    columns = [
        ("layer", "Layer", "int"),
        ("verdict", "Verdict", "verdict"),
        ("signed_shift", "Signed shift", "signed"),
        ("ci_low", "CI low", "signed"),
        ("ci_high", "CI high", "signed"),
        ("effect", "Effect", "signed"),
        ("q_signed", "q signed", "q"),
        ("q_abs", "q abs", "q"),
        ("mean_diff", "Mean diff", "signed"),
        ("frac_pos", "Cells \u2191", "pct"),
        ("frac_neg", "Cells \u2193", "pct"),
        ("jsd", "JSD", "fixed4"),
        ("sink_change", "Sink \u0394", "signed"),
        ("entropy_change", "Entropy \u0394", "signed"),
    ]
    assert table["head"] == [label for _, label, _ in columns]
    body = [r for r in table["rows"] if r["cells"]]
    assert len(body) == len(frame) == 3
    order = ["vulnerable", "mixed", "resilient", "no significant shift"]
    for tr, rec in zip(body, frame.to_dict("records"), strict=True):
        assert tr["attrs"] == {"class": "pick", "data-model": "0", "data-layer": str(rec["layer"])}
        for (text, sort), (key, _, kind) in zip(tr["cells"], columns, strict=True):
            if kind == "verdict":
                assert text == rec["verdict"] and sort == str(order.index(rec["verdict"])), key
            elif kind == "int":
                assert text == str(rec["layer"]) and float(sort) == rec["layer"], key
            else:
                assert text == shown(rec[key], kind), (key, text, rec[key])
                assert float(sort) == rec[key], key
    assert "Significance level \u03b1 = 0.05 (Benjamini\u2013Hochberg)." in page
    assert {r["verdict"] for r in frame.to_dict("records")} == {"mixed", NO_SHIFT}  # two verdicts, two sort keys
    without = build_report(**{**inputs, "tables": {}})
    assert "No layer table for tiny." in without and "class='sortable data' data-model" not in without
