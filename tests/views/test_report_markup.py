"""Every user-controlled string that reaches the report (model labels, set names, prompt texts, tokens, title,
observations, manifest fields) stays text: the page is parsed with the standard library's HTML parser, and a page
built with injection markers must have exactly the element structure of a page built with harmless placeholders in
the same places, with each marker readable as text."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd
from report_data import BENIGN, BENIGN_LENGTHS, JAILBREAK, JAILBREAK_LENGTHS, make_manifest, make_set

from attnscan import PromptSet, ScanResult
from attnscan.analysis.statistics import layer_table
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
