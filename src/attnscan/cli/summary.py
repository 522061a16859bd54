"""The terminal summary of ``attnscan run``: per model, with a control set, the headline table of the three
comparisons (request effect first), then the top layers of the request effect and of the combined shift.

Sized for an 80-column terminal. rich is imported inside the functions, so ``attnscan --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

__all__ = ["headline_table", "run_summary", "summary_table"]

_SHORT_VERDICTS = {"no significant shift": "n.s."}
_STYLES = {"vulnerable": "red", "resilient": "blue", "mixed": "magenta", "no significant shift": "dim"}
# comparison -> (what it measures, the sets it compares)
_HEADLINE_ROWS = {
    "request": ("request", "jailbreak − control"),
    "wrapper": ("wrapper", "control − benign"),
    "combined": ("combined", "jailbreak − benign"),
}


def summary_table(tables: Mapping[str, Any], top: int = 5, titles: Mapping[str, str] | None = None) -> Group:
    """Rich tables of each model's top layers (one table a model): significant ones by rank, else the largest shifts.

    ``titles`` (model label -> title) replaces the default title, "Top layers of LABEL (jailbreak vs benign)". The
    shift is the block shift in nats with its bootstrap 95 % interval, and ``%+`` / ``%-`` are the shares of cells
    where the first set's attention is higher / lower."""
    from rich.console import Group
    from rich.table import Table

    out = []
    for label, frame in tables.items():
        title = (titles or {}).get(label, f"Top layers of {label} (jailbreak vs benign)")
        table = Table(title=title, title_justify="left")
        for col in ("layer", "verdict", "shift [95% CI]", "effect", "q", "%+", "%-"):
            table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
        order = frame.assign(_k=frame["rank"].fillna(1e9), _e=-frame["signed_shift"].abs()).sort_values(["_k", "_e"])
        for _, row in order.head(top).iterrows():
            q = min(row["q_signed"], row["q_abs"])
            table.add_row(
                str(int(row["layer"])),
                f"[{_STYLES.get(row['verdict'], '')}]{_SHORT_VERDICTS.get(row['verdict'], row['verdict'])}",
                f"{row['signed_shift']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]",
                f"{row['effect']:+.2f}",
                f"{q:.2g}",
                f"{row['frac_pos']:.0%}",
                f"{row['frac_neg']:.0%}",
            )
        if (order.head(top)["verdict"] == "no significant shift").any():
            table.caption, table.caption_justify = "n.s.: no significant shift", "left"
        out.append(table)
    return Group(*out)


def headline_table(label: str, comparisons: Mapping[str, Any]) -> Table:
    """One row per comparison of a control scan (``comparisons``: ``request``, ``wrapper``, ``combined`` -> layer
    table), request effect first: layers significant after Benjamini–Hochberg, the layer with the largest |effect|
    (standardized effect size) with its q, and the layer with the largest |signed block shift| (nats, the measure
    the layer profile draws)."""
    from rich.table import Table

    table = Table(title=f"Effects in {label}, request effect first", title_justify="left")
    for col in ("effect", "sets", "signif.", "max |effect|", "max |shift|"):
        table.add_column(col, justify="left" if col in ("effect", "sets") else "right", no_wrap=True)
    for key, (name, sets) in _HEADLINE_ROWS.items():
        if key not in comparisons:
            continue
        frame = comparisons[key]
        significant = int((frame["verdict"] != "no significant shift").sum())
        by_effect = frame.loc[frame["effect"].abs().fillna(-1.0).idxmax()]
        by_shift = frame.loc[frame["signed_shift"].abs().fillna(-1.0).idxmax()]
        q = min(by_effect["q_signed"], by_effect["q_abs"])
        table.add_row(
            name,
            sets,
            f"{significant}/{len(frame)}",
            f"L{int(by_effect['layer'])} {by_effect['effect']:+.2f} q={q:.2g}",
            f"L{int(by_shift['layer'])} {by_shift['signed_shift']:+.2f}",
        )
    table.caption = "signif.: BH q < alpha; effect: standardized; shift: signed block shift (nats)"
    table.caption_justify = "left"
    return table


def run_summary(tables: Mapping[str, Any], effects: Mapping[str, Any]) -> Group:
    """What ``attnscan run`` prints before the observations: per model with a control set (``effects``: label ->
    :func:`~attnscan.analysis.statistics.effects_table`) the headline table and the top layers of the request
    effect, then every model's top layers of the combined jailbreak-vs-benign shift."""
    from rich.console import Group

    from ..analysis.statistics import split_effects

    parts: list[Any] = []
    for label, table in tables.items():
        if label in effects:
            split = split_effects(effects[label])
            parts.append(headline_table(label, {**split, "combined": table}))
            title = f"Top layers of {label} (request: jailbreak vs control)"
            parts.append(summary_table({label: split["request"]}, titles={label: title}))
    combined = {k: f"Top layers of {k} (combined: jailbreak vs benign)" for k in tables if k in effects}
    parts.append(summary_table(tables, titles=combined))
    return Group(*parts)
