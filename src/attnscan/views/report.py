"""The HTML report: one self-contained file with provenance, verdict tables, the layer profile, interactive heatmaps,
a prompt browser and the observations.

Compute -> plain data -> renderer:

- :func:`attnscan.views.digest.build_digest` turns results, layer tables, observations and (optionally) prompt texts
  and tokens into a plain JSON-able dict; heatmaps are decimated and quantised there (:mod:`attnscan.views.maps`).
- :func:`attnscan.views.page.render_html` turns a digest into the HTML document (the charts:
  :mod:`attnscan.views.svg`).
- :func:`build_report` is both in one call; :func:`write_report` writes the document atomically.

The page loads nothing from the network: no CDN, no fonts, no images. A Content-Security-Policy meta tag allows only
the page's own inline script and style (by sha256 hash), so an injected ``<script>`` or ``onerror=`` could not run
even if escaping failed. Prompt texts and tokens the bundles do not hold are reloaded by :mod:`attnscan.rundir`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_file
from ..errors import AttnscanError
from .digest import DEFAULT_TITLE, DISPLAY_SIZE, EXAMPLES, MAP_BUDGET, build_digest
from .page import render_html

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

    from ..analysis.result import ScanResult

__all__ = ["build_report", "write_report"]


def build_report(
    results: Mapping[str, ScanResult],
    tables: Mapping[str, pd.DataFrame],
    observations: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    tokens: Mapping[str, Sequence[str]] | None = None,
    title: str = DEFAULT_TITLE,
    *,
    display_size: int = DISPLAY_SIZE,
    map_budget: int = MAP_BUDGET,
    examples: int = EXAMPLES,
    generated: str | None = None,
    detection: Mapping[str, pd.DataFrame] | None = None,
) -> str:
    """One self-contained HTML document reporting one or more scans.

    Args:
        results: model label -> scan result (e.g. from :func:`attnscan.rundir.load_bundles`).
        tables: model label -> :func:`attnscan.analysis.statistics.layer_table` of that result (a model without
            one gets no verdict table and no profile line).
        observations: sentences from :func:`attnscan.analysis.statistics.observations`, shown as a list.
        prompts: model label -> {set name -> prompt texts in scan order}, for the prompt browser (the first
            ``examples`` of each set, with their token counts from the result). Texts whose sha256 differs from the
            one the manifest recorded are flagged. :func:`attnscan.rundir.prompts_from_manifest` reloads them for a
            bundle.
        tokens: model label -> token strings at grid positions 0, 1, ... that every prompt shares (e.g. the chat
            template prefix from :func:`attnscan.rundir.prefix_tokens`), shown when hovering a heatmap.
        title: the page title.
        display_size: largest heatmap side in display cells (see :mod:`attnscan.views.maps`).
        map_budget: upper bound on the heatmaps' base64 bytes; the block size grows until they fit.
        examples: prompts shown per set.
        generated: timestamp shown in the header (default: now, UTC).
        detection: model label -> detection table (``detection.csv`` of ``attnscan detect train``); its
            cross-validated AUROC per layer is drawn beside the layer profile.

    Every prompt, token and manifest string is escaped; data reach the page as JSON that cannot close its script
    element, and the page's script inserts text only through ``textContent``.
    """
    digest = build_digest(
        results,
        tables,
        observations,
        prompts,
        tokens,
        title,
        display_size=display_size,
        map_budget=map_budget,
        examples=examples,
        generated=generated,
        detection=detection,
    )
    return render_html(digest)


def write_report(path: str | Path, html_text: str) -> Path:
    """Write ``html_text`` to ``path`` atomically (temporary file in the same directory, then one rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AttnscanError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise AttnscanError(f"cannot write the report to {path}: it is a directory; give a file name like report.html")
    with atomic_file(path) as tmp:
        tmp.write_text(html_text, encoding="utf-8", newline="\n")
    return path
