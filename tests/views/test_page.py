"""``views/page.py`` piece by piece: the JSON that feeds the page's script, the Content-Security-Policy, the colour
rules, and every branch of the static sections (tables, heatmap notes, prompt browser, provenance).

Each test renders its own page from a fresh digest, and the page's asset cache is emptied first: a page rendered
once in a module fixture would be credited by mutmut to the first test that asked for it, and the other tests'
checks would never run against a mutant. The page is read back with the standard library's HTML parser."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import attnscan.views
from attnscan.views.digest import build_digest
from attnscan.views.formatting import VERDICT_ORDER, verdict_class
from attnscan.views.page import _asset, _color_rules, _csp_hash, _json_for_script, _page_assets, render_html
from attnscan.views.palette import MODEL_STYLES, OTHER_VERDICT_COLOR, VERDICT_COLORS


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[Node] = []
        self.parts: list[str] = []  # the text of this element and of every element inside it
        self.own: list[str] = []  # the text directly inside this element

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if child.tag == tag and all(child.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                found.append(child)
            found += child.find_all(tag, **attrs)
        return found

    def find(self, tag: str, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


VOID = {"meta", "link", "input", "br", "img", "hr"}


class Tree(HTMLParser):
    """The page as a tree of elements (void elements have no children); text is credited to every open element."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("", {})
        self._open = [self.root]
        self.feed(page)
        self.close()
        assert self._open == [self.root], [n.tag for n in self._open]  # every element was closed

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self._open[-1].children.append(node)
        if tag not in VOID:
            self._open.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self._open[-1].tag == tag, (self._open[-1].tag, tag)  # well nested
        self._open.pop()

    def handle_data(self, data: str) -> None:
        for node in self._open:
            node.parts.append(data)
        self._open[-1].own.append(data)

    def walk(self, node: Node | None = None) -> list[Node]:
        node = node or self.root
        return [node] + [n for child in node.children for n in self.walk(child)]


@pytest.fixture
def digest(inputs: dict[str, Any]) -> dict[str, Any]:
    """A fresh digest of the planted scan, the test's own to change; the page's assets are read anew."""
    _page_assets.cache_clear()
    return build_digest(**inputs)


#: Elements that hold only other elements: text directly inside them is stray (browsers move text out of tables).
CONTAINERS = {"html", "head", "body", "header", "nav", "main", "section", "table", "thead", "tbody", "tr", "ul", "dl"}
CONTAINER_DIVS = {"controls", "scroll", "panels"}


def tree(digest: dict[str, Any]) -> Node:
    """The rendered page, checked for stray text between elements."""
    parsed = Tree(render_html(digest))
    for node in parsed.walk():
        if node.tag in CONTAINERS or (node.tag == "div" and node.attrs.get("class") in CONTAINER_DIVS):
            assert "".join(node.own).strip() == "", (node.tag, node.attrs, node.own)
        if node.tag == "details":  # a summary, then elements
            assert "".join(node.own).strip() == "", node.own
    return parsed.root


def second_model(digest: dict[str, Any], label: str) -> None:
    """Adds a copy of the first model under another label (and lists it in every prompt group)."""
    model = json.loads(json.dumps(digest["models"][0]))
    model["label"] = label
    digest["models"].append(model)
    for group in digest["prompts"]:
        group["models"].append(label)


# --- the data element and the policy ---------------------------------------------------------------------------


def test_script_json_is_compact_ascii_and_cannot_leave_its_element() -> None:
    data = {"t": "</script><!-- a & b > c \u2028\u2029 \u00e9", "n": [1, 2.5, None, True]}
    raw = _json_for_script(data)
    assert raw == (
        '{"t":"\\u003c/script\\u003e\\u003c!-- a \\u0026 b \\u003e c \\u2028\\u2029 \\u00e9","n":[1,2.5,null,true]}'
    )
    assert json.loads(raw) == data
    with pytest.raises(ValueError, match="not JSON compliant"):  # NaN is not JSON: JSON.parse in the page would throw
        _json_for_script({"x": float("nan")})


def test_csp_hash_is_the_base64_sha256_of_the_utf8_text() -> None:
    # FIPS 180-2's first example: sha256("abc") = ba7816bf 8f01cfea ... f20015ad
    assert _csp_hash("abc") == "'sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0='"
    text = "\nrule{content:'\u00e9\u2192'}"
    expected = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
    assert _csp_hash(text) == f"'sha256-{expected}'"


def test_policy_allows_only_the_inline_script_and_style(digest: dict[str, Any]) -> None:
    root = tree(digest)
    style, script = root.find("style").text, root.find("script", type=None).text
    csp = root.find("meta", **{"http-equiv": "Content-Security-Policy"}).attrs["content"]
    assert csp == (
        "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
        f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}"
    )
    assets = Path(attnscan.views.__file__).parent / "assets"
    assert _asset("report.js") == (assets / "report.js").read_text(encoding="utf-8")
    assert script == "\n" + (assets / "report.js").read_text(encoding="utf-8")
    assert style == "\n" + (assets / "report.css").read_text(encoding="utf-8") + _color_rules()
    assert root.find("script", type="application/json", id="attnscan-data").text == _json_for_script(digest)


def test_colour_rules_match_the_figures() -> None:
    css = _color_rules()
    assert css.endswith("}\n") and css.count("\n") == 1
    rules = dict(re.findall(r"\.([a-z0-9]+)\{([^}]*)\}", css))
    expected = {verdict_class(v): f"background:{VERDICT_COLORS[v]};fill:{VERDICT_COLORS[v]}" for v in VERDICT_ORDER}
    expected[verdict_class("anything else")] = f"background:{OTHER_VERDICT_COLOR};fill:{OTHER_VERDICT_COLOR}"
    expected.update({f"m{i}": f"background:{style.color}" for i, style in enumerate(MODEL_STYLES)})
    assert rules == expected
    assert css == "".join(f".{name}{{{body}}}" for name, body in rules.items()) + "\n"  # nothing between rules


# --- the page's frame ------------------------------------------------------------------------------------------


def test_frame_title_navigation_and_sections(digest: dict[str, Any]) -> None:
    page = render_html(digest)
    assert page.startswith("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>") and page.endswith(
        "</html>\n"
    )
    root = Tree(page).root
    assert root.find("head").find("title").text == digest["title"] == root.find("h1").text
    header = root.find("header").find_all("p")[0].text
    assert header == f"tiny · generated {digest['generated']} by attnscan {digest['attnscan_version']}"
    metas = [m.attrs for m in root.find("head").find_all("meta")][2:]
    assert metas == [
        {"name": "viewport", "content": "width=device-width, initial-scale=1"},
        {"name": "generator", "content": "attnscan"},
    ]
    assert [a.text for a in root.find("nav").find_all("a")] == [
        "Observations",
        "Layer profile",
        "Heatmaps",
        "Verdict table",
        "Prompts",
        "Provenance",
    ]
    links = [a.attrs["href"] for a in root.find("nav").find_all("a")]
    sections = [s.attrs["id"] for s in root.find("main").children if s.tag == "section"]
    assert links == [f"#{s}" for s in sections]
    assert sections == ["observations", "profile", "heatmaps", "verdicts", "prompts", "provenance"]
    assert [s.find_all("h2")[0].text for s in root.find("main").children] == [
        "Observations",
        "Layer profile",
        "Attention heatmaps",
        "Verdict table",
        "Prompt browser",
        "Provenance",
    ]
    assert root.find("div", id="tip").attrs == {"id": "tip", "class": "tip", "role": "status", "hidden": None}
    second_model(digest, "other <model>")
    assert Tree(render_html(digest)).root.find("header").find_all("p")[0].text.startswith("tiny, other <model> · ")


def test_observations_as_a_list_or_a_note(digest: dict[str, Any]) -> None:
    digest["observations"] = ["first <b>one</b>", "second & last"]
    section = tree(digest).find("section", id="observations")
    assert [li.text for li in section.find("ul", class_="obs").find_all("li")] == digest["observations"]
    assert section.text == "Observations" + "".join(digest["observations"])
    digest["observations"] = []
    section = tree(digest).find("section", id="observations")
    assert section.find_all("ul") == [] and section.find("p", class_="muted").text == "No observations were given."
    assert section.text == "ObservationsNo observations were given."


# --- the verdict table -----------------------------------------------------------------------------------------


def test_table_headers_say_how_to_sort(digest: dict[str, Any]) -> None:
    table = digest["models"][0]["table"]
    heads = tree(digest).find("table", class_="sortable data").find("thead").find_all("th")
    assert [th.text for th in heads] == table["labels"]
    for th, tip, fmt in zip(heads, table["tips"], table["formats"], strict=True):
        kind = {"scope": "col", "data-type": "text", "class": "l"} if fmt == "verdict" else {"data-type": "num"}
        assert th.attrs == {"scope": "col", **kind, "title": tip}


def test_table_rows_for_unknown_verdicts_missing_values_and_no_layer_column(digest: dict[str, Any]) -> None:
    table = digest["models"][0]["table"]
    vcol, scol = table["formats"].index("verdict"), table["formats"].index("signed")
    table["rows"][0][vcol] = "odd <verdict>"
    table["rows"][0][scol] = None
    table["rows"][1][scol] = -0.5
    rows = tree(digest).find("table", class_="sortable data").find("tbody").find_all("tr")
    first = rows[0].find_all("td")
    assert first[vcol].attrs == {"class": "l", "data-v": str(len(VERDICT_ORDER))}
    assert first[vcol].text == "odd <verdict>" and first[vcol].find("span").attrs["class"] == "chip vx"
    assert first[scol].attrs == {"data-v": ""} and first[scol].text == "—"
    second = rows[1].find_all("td")
    assert second[scol].attrs == {"data-v": "-0.5"} and second[scol].text == "−0.500"
    verdict = table["rows"][1][vcol]
    assert second[vcol].find("span").attrs["class"] == f"chip {verdict_class(verdict)}"
    assert second[vcol].attrs["data-v"] == str(VERDICT_ORDER.index(verdict))
    assert [tr.attrs for tr in rows] == [
        {"class": "pick", "data-model": "0", "data-layer": str(int(row[0]))} for row in table["rows"]
    ]
    note = tree(digest).find("section", id="verdicts").find_all("p")[0].text
    assert note == (
        "Click a column header to sort; click a row to show that layer's heatmaps. "
        "Significance level α = 0.05 (Benjamini–Hochberg)."
    )
    # a table without a layer column (and without a significance level): rows carry no layer to show
    for key in ("columns", "labels", "tips", "formats"):
        table[key] = table[key][1:]
    table["rows"] = [row[1:] for row in table["rows"]]
    del table["alpha"]
    section = tree(digest).find("section", id="verdicts")
    assert [tr.attrs for tr in section.find("tbody").find_all("tr")] == [{"class": "pick"}] * len(table["rows"])
    assert section.find_all("p")[0].text.endswith("that layer's heatmaps.")
    assert section.find("h3").text == "tiny"


@pytest.mark.parametrize("part", ["labels", "row"])
def test_a_table_whose_parts_disagree_in_length_is_refused(digest: dict[str, Any], part: str) -> None:
    """A row (or a header list) one short would otherwise shift every later cell under the wrong column."""
    table = digest["models"][0]["table"]
    if part == "row":
        table["rows"][1] = table["rows"][1][:-1]
    else:
        table["labels"] = table["labels"][:-1]
    with pytest.raises(ValueError, match="zip"):
        render_html(digest)


def test_one_table_per_model_and_a_note_for_a_model_without_one(digest: dict[str, Any]) -> None:
    second_model(digest, "second")
    digest["models"][1]["table"] = None
    section = tree(digest).find("section", id="verdicts")
    assert [t.attrs["data-model"] for t in section.find_all("table")] == ["0"]
    assert section.find_all("p", class_="muted")[-1].text == "No layer table for second."


# --- heatmap controls ------------------------------------------------------------------------------------------


def test_heatmap_controls_and_the_resolution_note(digest: dict[str, Any]) -> None:
    second_model(digest, "b & c")
    section = tree(digest).find("section", id="heatmaps")
    options = section.find("select", id="hm-model").find_all("option")
    assert [(o.attrs["value"], o.text) for o in options] == [("0", "tiny"), ("1", "b & c")]
    assert section.find("select", id="hm-layer").attrs == {"id": "hm-layer"}
    assert section.find("span", id="hm-zoom-label").text == ""
    assert section.find("input", id="hm-zoom").attrs == {"type": "checkbox", "id": "hm-zoom", "checked": None}
    buttons = [(b.attrs["id"], b.attrs["aria-label"], b.text) for b in section.find_all("button")]
    assert buttons == [("hm-prev", "Previous layer", "◀"), ("hm-next", "Next layer", "▶")]
    divs = [d.attrs for d in section.find_all("div")]
    assert divs == [
        {"class": "controls"},
        {"id": "hm-caption", "class": "caption"},
        {"id": "hm-panels", "class": "panels"},
    ]
    assert [lab.text for lab in section.find_all("label")] == ["Model tinyb & c", "Layer ", " "]
    note = section.find("p", class_="muted").text
    assert note == (
        "Display: full resolution, T = 32. Log maps on viridis −10…0 (ln mean attention), difference (jailbreak − "
        "benign) on blue–white–red −4…4; grey cells are reached by no prompt. Values are stored with 8 bits (log maps "
        "to 0.04 nats; the difference on an asinh scale, 0.01 nats near 0, about 3 % at ±4). Hover a cell for "
        "positions, tokens and values."
    )
    assert section.text == "Attention heatmaps" + "Model tinyb & c" + "◀" + "Layer " + "▶" + " " + note
    digest["models"][0]["maps"]["full"].update(extent=448, factor=2, size=224)
    note = tree(digest).find("section", id="heatmaps").find("p", class_="muted").text
    assert note.startswith(
        "Display: 224×224 cells for T = 448, each the mean of a 2×2 block of token positions (the zoomed view is "
        "finer where it can be). Log maps"
    )


# --- the prompt browser ----------------------------------------------------------------------------------------


def test_prompt_browser_for_one_model(digest: dict[str, Any]) -> None:
    group = digest["prompts"][0]
    group["examples"][0]["chars"] = len(group["examples"][0]["text"]) + 17
    details = tree(digest).find("section", id="prompts").find_all("details", class_="pset")
    assert [d.attrs["open"] for d in details] == [None, None]
    assert [d.find("div", class_="scroll").find("table").attrs for d in details] == [
        {"class": "sortable data prompts"}
    ] * 2
    assert details[0].find("summary").text == f"benign — {len(group['examples'])} of {group['total']} prompts"
    assert [th.text for th in details[0].find("thead").find_all("th")] == ["#", "Tokens", "Prompt"]
    rows = details[0].find("tbody").find_all("tr")
    assert len(rows) == len(group["examples"])
    for tr, ex in zip(rows, group["examples"], strict=True):
        cells = tr.find_all("td")
        assert [c.attrs.get("data-v") for c in cells[:2]] == [str(ex["index"]), str(ex["tokens"]["tiny"])]
        assert [c.text for c in cells[:2]] == [str(ex["index"] + 1), str(ex["tokens"]["tiny"])]
        assert cells[2].attrs == {"class": "prompt l"}
    assert rows[0].find_all("td")[2].text == group["examples"][0]["text"] + " … (17 more characters)"
    assert rows[1].find_all("td")[2].text == group["examples"][1]["text"]
    assert details[0].find_all(tag="p", class_="warn") == []
    muted = details[0].find("p", class_="muted").text
    assert muted == f"sha256 {group['sha256']}. Token counts are on the grid (after the chat template, truncated to T)."


def test_prompt_browser_for_two_models_with_a_mismatch(digest: dict[str, Any]) -> None:
    second_model(digest, "b<2>")
    group = digest["prompts"][0]
    group["mismatch"] = ["tiny", "b<2>"]
    del group["examples"][0]["tokens"]["tiny"]
    group["examples"][1]["tokens"]["b<2>"] = 41
    details = tree(digest).find("section", id="prompts").find_all("details", class_="pset")[0]
    assert details.find("summary").text == f"benign — {len(group['examples'])} of {group['total']} prompts (tiny, b<2>)"
    assert [th.text for th in details.find("thead").find_all("th")] == ["#", "Tokens · tiny", "Tokens · b<2>", "Prompt"]
    rows = details.find("tbody").find_all("tr")
    assert [(c.text, c.attrs["data-v"]) for c in rows[0].find_all("td")[1:3]] == [("—", "")] * 2
    assert [c.text for c in rows[1].find_all("td")[1:3]] == [str(group["examples"][1]["tokens"]["tiny"]), "41"]
    assert details.find("p", class_="warn").text == (
        "These texts do not match the sha256 recorded for set 'benign' by tiny, b<2>: they may not be the prompts "
        "that were scanned."
    )


def test_prompt_browser_without_texts(digest: dict[str, Any]) -> None:
    digest["prompts"] = []
    section = tree(digest).find("section", id="prompts")
    assert section.find_all("details") == []
    assert section.find("p", class_="muted").text == (
        "No prompt texts were given to the report: the bundles record each set's source, count and sha256 "
        "(see Provenance)."
    )


# --- provenance ------------------------------------------------------------------------------------------------


def test_provenance_lists_and_set_table(digest: dict[str, Any]) -> None:
    model = digest["models"][0]
    sets = model["prompt_sets"]
    sets[0].update(count=6, of=10, tokens_min=5, tokens_max=32, tokens_mean=12.34, truncated=2)
    sets[1].update(count=None, of=None, tokens_min=None, source=None, sha256=None, truncated=None)
    section = tree(digest).find("section", id="provenance")
    dl = section.find("dl", class_="prov")
    assert [(dt.text, dd.text) for dt, dd in zip(dl.find_all("dt"), dl.find_all("dd"), strict=True)] == [
        tuple(row) for row in model["provenance"]
    ]
    table = section.find("table", class_="data")
    assert [th.text for th in table.find("thead").find_all("th")] == [
        "Set",
        "Source",
        "Prompts",
        "Tokens",
        "Truncated",
        "sha256 of the texts",
    ]
    rows = [[td.text for td in tr.find_all("td")] for tr in table.find("tbody").find_all("tr")]
    assert rows[0] == ["benign", "builtin:benign", "6 of 10", "5–32 (mean 12.3)", "2", sets[0]["sha256"]]
    assert rows[1] == ["jailbreak", "—", "—", "—", "—", "—"]
    sets[1].update(count=3, tokens_min=4, tokens_max=9, tokens_mean=None, truncated=0)
    table = tree(digest).find("section", id="provenance").find("table", class_="data")
    assert [td.text for td in table.find("tbody").find_all("tr")[1].find_all("td")][2:5] == ["3", "4–9", "0"]


def test_full_manifest_is_pretty_printed(digest: dict[str, Any]) -> None:
    model = digest["models"][0]
    model["manifest"]["note"] = "caf\u00e9 \u2192 na\u00efve"  # shown as written, not as \u escapes
    section = tree(digest).find("section", id="provenance")
    pre = section.find("pre", class_="manifest")
    assert pre.text == json.dumps(model["manifest"], indent=2, ensure_ascii=False)
    assert '"note": "caf\u00e9 \u2192 na\u00efve"' in pre.text
    assert section.find("h3").text == model["label"]
