"""The report page: a digest (:func:`attnscan.views.digest.build_digest`) rendered as one self-contained HTML document.

Static parts (provenance, tables, the layer profile as inline SVG, the prompt browser, observations) are rendered in
Python with every string passed through :func:`html.escape`; the heatmap viewer and table sorting are a small script
that reads the digest from a ``<script type="application/json">`` element and inserts text only through
``textContent``. The script and the style sheet live in ``attnscan/views/assets/report.js`` and ``report.css`` and
are copied inline into every page; a Content-Security-Policy meta tag allows only them (by sha256 hash).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from .formatting import VERDICT_ORDER, esc, format_value, verdict_class
from .palette import MODEL_STYLES, OTHER_VERDICT_COLOR, VERDICT_COLORS
from .svg import render_detection, render_profile

__all__ = ["render_html"]


def _json_for_script(data: Any) -> str:
    """JSON that cannot end a ``<script>`` element or start an HTML comment: ``<``, ``>``, ``&`` and U+2028/2029
    become ``\\uXXXX`` escapes (still the same JSON)."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for char, code in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, code)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _asset(name: str) -> str:
    """The text of ``attnscan/views/assets/<name>``, read through :mod:`importlib.resources` (so also from a wheel)."""
    return (resources.files("attnscan.views") / "assets" / name).read_text(encoding="utf-8")


def _css_rule(selector: str, declarations: str) -> str:
    return selector + "{" + declarations + "}"


def _color_rules() -> str:
    """Verdict (``.v0``-``.v3``, ``.vx``) and model (``.m0``-``.m5``) colours, from the same constants as the
    figures, so the page and the PNGs agree."""
    rules = [_css_rule(f".v{i}", f"background:{c};fill:{c}") for i, c in enumerate(VERDICT_COLORS.values())]
    rules.append(_css_rule(".vx", f"background:{OTHER_VERDICT_COLOR};fill:{OTHER_VERDICT_COLOR}"))
    rules += [_css_rule(f".m{i}", f"background:{style.color}") for i, style in enumerate(MODEL_STYLES)]
    return "".join(rules) + "\n"


@functools.cache
def _page_assets() -> tuple[str, str]:
    """``(style, script)``: the text of the page's ``<style>`` and ``<script>`` elements, each hashed into the
    Content-Security-Policy. They are ``assets/report.css`` (plus the colour rules) and ``assets/report.js``, each
    after a newline; no data ever enters them (the script reads the digest from the JSON element)."""
    return "\n" + _asset("report.css") + _color_rules(), "\n" + _asset("report.js")


def _render_observations(digest: Mapping[str, Any]) -> str:
    items = "".join(f"<li>{esc(s)}</li>" for s in digest["observations"])
    body = f"<ul class='obs'>{items}</ul>" if items else "<p class='muted'>No observations were given.</p>"
    return f"<section id='observations'><h2>Observations</h2>{body}</section>"


def _render_table(model: Mapping[str, Any], index: int) -> str:
    table = model["table"]
    if table is None:
        return f"<p class='muted'>No layer table for {esc(model['label'])}.</p>"
    head = "".join(
        ("<th scope='col' data-type='text' class='l'" if fmt == "verdict" else "<th scope='col' data-type='num'")
        + f" title='{esc(tip)}'>{esc(lab)}</th>"
        for lab, tip, fmt in zip(table["labels"], table["tips"], table["formats"], strict=True)
    )
    body = []
    for row in table["rows"]:
        cells = []
        layer = None
        for key, fmt, value in zip(table["columns"], table["formats"], row, strict=True):
            if key == "layer":
                layer = value
            if fmt == "verdict":
                order = VERDICT_ORDER.index(value) if value in VERDICT_ORDER else len(VERDICT_ORDER)
                chip = f"<span class='chip {verdict_class(value)}'></span>"
                cells.append(f"<td class='l' data-v='{order}'>{chip}{esc(value)}</td>")
            else:
                sort = "" if value is None else repr(float(value))
                cells.append(f"<td data-v='{esc(sort)}'>{esc(format_value(value, fmt))}</td>")
        attr = "" if layer is None else f" data-model='{index}' data-layer='{int(layer)}'"
        body.append(f"<tr class='pick'{attr}>{''.join(cells)}</tr>")
    alpha = table.get("alpha")
    note = f" Significance level α = {alpha:g} (Benjamini–Hochberg)." if alpha is not None else ""
    return (
        f"<h3>{esc(model['label'])}</h3>"
        f"<p class='muted'>Click a column header to sort; click a row to show that layer's heatmaps.{esc(note)}</p>"
        f"<div class='scroll'><table class='sortable data' data-model='{index}'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _render_heatmaps(digest: Mapping[str, Any]) -> str:
    options = "".join(f"<option value='{k}'>{esc(m['label'])}</option>" for k, m in enumerate(digest["models"]))
    first = digest["models"][0]["maps"]["full"]
    if first["factor"] > 1:
        decimation = (
            f"Display: {first['size']}×{first['size']} cells for T = {first['extent']}, each the mean of a "
            f"{first['factor']}×{first['factor']} block of token positions (the zoomed view is finer where it can be)."
        )
    else:
        decimation = f"Display: full resolution, T = {first['extent']}."
    note = (
        f"{decimation} Log maps on viridis −10…0 (ln mean attention), difference (jailbreak − benign) on "
        "blue–white–red −4…4; grey cells are reached by no prompt. Values are stored with 8 bits (log maps to "
        "0.04 nats; the difference on an asinh scale, 0.01 nats near 0, about 3 % at ±4). Hover a cell for "
        "positions, tokens and values."
    )
    return (
        "<div class='controls'>"
        "<label>Model <select id='hm-model'>" + options + "</select></label>"
        "<button type='button' id='hm-prev' aria-label='Previous layer'>◀</button>"
        "<label>Layer <select id='hm-layer'></select></label>"
        "<button type='button' id='hm-next' aria-label='Next layer'>▶</button>"
        "<label id='hm-zoom-box'><input type='checkbox' id='hm-zoom' checked> <span id='hm-zoom-label'></span></label>"
        "</div><div id='hm-caption' class='caption'></div>"
        "<div id='hm-panels' class='panels'></div>"
        f"<p class='muted'>{esc(note)}</p>"
    )


def _render_prompts(digest: Mapping[str, Any]) -> str:
    if not digest["prompts"]:
        reason = (
            "No prompt texts were given to the report: the bundles record each set's source, count and sha256 "
            "(see Provenance)."
        )
        return f"<p class='muted'>{esc(reason)}</p>"
    labels = [m["label"] for m in digest["models"]]
    out = []
    for group in digest["prompts"]:
        models = [m for m in labels if m in group["models"]]
        shown = len(group["examples"])
        title = f"{group['set']} — {shown} of {group['total']} prompts"
        if len(labels) > 1:
            title += f" ({', '.join(models)})"
        warn = ""
        if group["mismatch"]:
            warn = (
                f"<p class='warn'>These texts do not match the sha256 recorded for set '{esc(group['set'])}' by "
                f"{esc(', '.join(group['mismatch']))}: they may not be the prompts that were scanned.</p>"
            )
        heads = "".join(
            f"<th scope='col' data-type='num'>Tokens{esc(' · ' + m if len(models) > 1 else '')}</th>" for m in models
        )
        rows = []
        for ex in group["examples"]:
            counts = "".join(
                f"<td data-v='{esc(ex['tokens'].get(m, ''))}'>{esc(ex['tokens'].get(m, '—'))}</td>" for m in models
            )
            more = ""
            if ex["chars"] > len(ex["text"]):
                more = f"<span class='muted'> … ({ex['chars'] - len(ex['text'])} more characters)</span>"
            rows.append(
                f"<tr><td data-v='{ex['index']}'>{ex['index'] + 1}</td>{counts}"
                f"<td class='prompt l'><div class='ptext'>{esc(ex['text'])}{more}</div></td></tr>"
            )
        out.append(
            f"<details class='pset' open><summary>{esc(title)}</summary>{warn}"
            f"<p class='muted'>sha256 {esc(group['sha256'])}. Token counts are on the grid (after the chat "
            "template, truncated to T).</p>"
            "<div class='scroll'><table class='sortable data prompts'><thead><tr>"
            f"<th scope='col' data-type='num'>#</th>{heads}"
            "<th scope='col' data-type='text' class='l'>Prompt</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></details>"
        )
    return "".join(out)


def _render_provenance(digest: Mapping[str, Any]) -> str:
    out = []
    for model in digest["models"]:
        rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in model["provenance"])
        sets = []
        for s in model["prompt_sets"]:
            count = "—" if s["count"] is None else str(s["count"])
            if s["of"] is not None:
                count += f" of {s['of']}"
            toks = "—"
            if s["tokens_min"] is not None:
                mean = s["tokens_mean"]
                toks = f"{s['tokens_min']}–{s['tokens_max']}" + (f" (mean {mean:.1f})" if mean is not None else "")
            sets.append(
                f"<tr><td>{esc(s['name'])}</td><td class='l'>{esc(s['source'] or '—')}</td><td>{esc(count)}</td>"
                f"<td>{esc(toks)}</td><td>{esc('—' if s['truncated'] is None else s['truncated'])}</td>"
                f"<td class='hash'>{esc(s['sha256'] or '—')}</td></tr>"
            )
        manifest = json.dumps(model["manifest"], indent=2, ensure_ascii=False)
        out.append(
            f"<h3>{esc(model['label'])}</h3><dl class='prov'>{rows}</dl>"
            "<div class='scroll'><table class='data'><thead><tr><th>Set</th><th class='l'>Source</th><th>Prompts</th>"
            "<th>Tokens</th><th>Truncated</th><th class='l'>sha256 of the texts</th></tr></thead>"
            f"<tbody>{''.join(sets)}</tbody></table></div>"
            f"<details><summary>Full manifest</summary><pre class='manifest'>{esc(manifest)}</pre></details>"
        )
    return "".join(out)


def render_html(digest: Mapping[str, Any]) -> str:
    """The report document for a digest from :func:`~attnscan.views.digest.build_digest`."""
    title = esc(digest["title"])
    style, script = _page_assets()
    labels = ", ".join(m["label"] for m in digest["models"])
    csp = (
        "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
        f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}"
    )
    tables = "".join(_render_table(m, k) for k, m in enumerate(digest["models"]))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{esc(csp)}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='generator' content='attnscan'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{title}</title><style>{style}</style></head><body>"
        f"<header><h1>{title}</h1><p class='muted'>{esc(labels)} · generated {esc(digest['generated'])} by "
        f"attnscan {esc(digest['attnscan_version'])}</p>"
        "<nav><a href='#observations'>Observations</a><a href='#profile'>Layer profile</a>"
        "<a href='#heatmaps'>Heatmaps</a><a href='#verdicts'>Verdict table</a><a href='#prompts'>Prompts</a>"
        "<a href='#provenance'>Provenance</a></nav></header><main>"
        f"{_render_observations(digest)}"
        f"<section id='profile'><h2>Layer profile</h2>{render_profile(digest)}{render_detection(digest)}</section>"
        f"<section id='heatmaps'><h2>Attention heatmaps</h2>{_render_heatmaps(digest)}</section>"
        f"<section id='verdicts'><h2>Verdict table</h2>{tables}</section>"
        f"<section id='prompts'><h2>Prompt browser</h2>{_render_prompts(digest)}</section>"
        f"<section id='provenance'><h2>Provenance</h2>{_render_provenance(digest)}</section>"
        "</main><div id='tip' class='tip' role='status' hidden></div>"
        f"<script type='application/json' id='attnscan-data'>{_json_for_script(digest)}</script>"
        f"<script>{script}</script></body></html>\n"
    )
