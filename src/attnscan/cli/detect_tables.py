"""What ``attnscan detect train`` and ``detect eval`` print: rich tables of the per-layer results with the text
baseline beside every detector, the flag rates per family, and the lines around them. Every table fits an
80-column terminal; the sentences come from :mod:`attnscan.detect.summary`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from ..detect.store import TrainedDetector

__all__ = ["evaluation_lines", "families_table", "layer_rich_table", "training_lines"]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def fmt_ci(value: Any, low: Any, high: Any, signed: bool = False) -> str:
    """``0.912 [0.850-0.960]`` (``signed``: ``+0.052 [-0.010,+0.090]``); the value alone without an interval,
    ``-`` without a value."""
    if not _finite(value):
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    if not (_finite(low) and _finite(high)):
        return f.format(value)
    sep = "," if signed else "-"
    return f"{f.format(value)} [{f.format(low)}{sep}{f.format(high)}]"


def _margin_header(primary: str) -> str:
    return f"{primary.upper() if primary == 'cp' else 'probe'} − text\n[95% CI]"


def layer_rich_table(
    frame: Any, title: str, top: int, by: str = "cp_auroc", extra: bool = False, primary: str = "cp"
) -> Table:
    """A detection table (``extra=False``: the ``top`` layers of ``detect train`` by ``by``, descending) or an
    evaluation table (``extra=True``: up to ``top`` layers nearest the trained one, in layer order, with training's
    cross-validated AUROC and the trained layer marked ``used``), as a rich table for an 80-column terminal. With a
    text baseline (``text_margin`` column) the ``primary`` detector's margin over it, with its interval, stands
    beside the detectors."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    margin = "text_margin" in frame.columns
    columns = ["layer", "CP AUROC\n[95% CI]"]
    if extra:
        columns += ["probe\nAUROC", "CV CP\nAUROC"]
    else:
        columns += ["CP\nTPR@5%"] + (["probe\nAUROC"] if margin else ["CP\nF1", "probe AUROC\n[95% CI]"])
    columns += [_margin_header(primary)] if margin else []
    columns += ["used" if extra else "flag"]
    for col in columns:
        left = "CI" in col or col in ("flag", "used")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for _, row in _rows(frame, top, by, extra).iterrows():
        cells = [str(int(row["layer"])), fmt_ci(row["cp_auroc"], row["cp_auroc_low"], row["cp_auroc_high"])]
        if extra:
            cells += [f"{row['probe_auroc']:.3f}", fmt_ci(row.get("cv_cp_auroc"), None, None)]
        elif margin:
            cells += [f"{row['cp_tpr5']:.2f}", f"{row['probe_auroc']:.3f}"]
        else:
            probe = fmt_ci(row["probe_auroc"], row["probe_auroc_low"], row["probe_auroc_high"])
            cells += [f"{row['cp_tpr5']:.2f}", f"{row['cp_f1']:.2f}", probe]
        if margin:
            cells.append(fmt_ci(row["text_margin"], row["text_margin_low"], row["text_margin_high"], signed=True))
        mark = row.get("trained_layer" if extra else "flagged")
        cells.append(("[bold]yes" if extra else "[red]yes") if mark is True or mark == 1 else "")
        table.add_row(*cells)
    return table


def _rows(frame: Any, top: int, by: str, extra: bool) -> Any:
    """The rows a table shows: by ``by`` descending (training), or the ``top`` nearest the trained layer in layer
    order (evaluation: a layer is never picked on the evaluation prompts)."""
    if not extra:
        order = frame.assign(_by=frame[by].fillna(-1.0), _l=frame["layer"])
        return order.sort_values(["_by", "_l"], ascending=[False, True]).head(top)
    marked = frame["trained_layer"].astype(bool) if "trained_layer" in frame else frame["layer"] < 0
    centre = int(frame.loc[marked, "layer"].iloc[0]) if marked.any() else int(frame["layer"].iloc[0])
    near = frame.assign(_d=(frame["layer"] - centre).abs()).sort_values(["_d", "layer"]).head(top)
    return near.sort_values("layer")


def families_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """The flag rates per family and on risky-looking benign prompts (:mod:`attnscan.detect.rates` rows)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("prompts", "subset", "rate [95% CI]", "flagged"):
        table.add_column(col, justify="right" if col == "flagged" else "left", no_wrap=col != "subset")
    for r in rows:
        rate = f"{r['measure']} " + fmt_ci(r["rate"], r["rate_low"], r["rate_high"])
        table.add_row(str(r["role"]), str(r["subset"]), rate, f"{r['flagged']}/{r['n']}")
    return table


def training_lines(trained: TrainedDetector, threshold: float) -> list[str]:
    """The lines under the ``detect train`` table: best and flagged layers, baselines and the margin at the best
    layer, the operating point, and the rank stability."""
    from ..detect.summary import baseline_sentence, margin_sentence, stability_sentence

    flagged = ", ".join(map(str, trained.flagged_layers)) or "none"
    lines = [f"best layer {trained.best_layer}; flagged (AUROC >= {threshold}): {flagged}"]
    base = trained.meta.get("baselines")
    if isinstance(base, dict):
        lines.append(baseline_sentence(base))
        margin = (base.get("text_margin"), base.get("text_margin_low"), base.get("text_margin_high"))
        lines.append(margin_sentence(trained.primary, *margin, where=f"at layer {trained.best_layer}"))
    else:
        lines.append("no text baseline (--no-baselines, or unlabelled prompts): pass --baselines to compare")
    point = trained.meta.get("operating_point")
    if isinstance(point, dict):
        lines.append(
            f"operating point at FPR {point['fpr']:g}: threshold {point['threshold']:.4g}, out-of-fold TPR "
            f"{point['tpr']:.2f} at FPR {point['fpr_oof']:.3f} (layer {point['layer']}, {point['kind']})"
        )
    stability = stability_sentence(trained.meta.get("stability"))
    if stability:
        lines.append(stability)
    return lines


def evaluation_lines(top: Mapping[str, Any], n_benign: int, n_jailbreak: int) -> list[str]:
    """The headline of ``detect eval``: the trained layer's detector on the new prompts beside the baselines."""
    from ..detect.summary import baseline_sentence, margin_sentence, stability_sentence

    kind = "CP" if top["kind"] == "cp" else "probe"
    other = "probe" if top["kind"] == "cp" else "cp"
    cv = f"; cross-validated in training {top['cv_auroc']:.3f}" if _finite(top.get("cv_auroc")) else ""
    target = f", target {top['fpr_target']:g}" if _finite(top.get("fpr_target")) else ""
    lines = [
        f"The detector as trained: layer {top['layer']} (chosen in training), {kind}, on {n_benign} benign + "
        f"{n_jailbreak} jailbreak prompts",
        f"  AUROC {fmt_ci(top['auroc'], top['auroc_low'], top['auroc_high'])} ({top['intervals']}){cv}; "
        f"{other} {top[f'{other}_auroc']:.3f}",
        f"  at threshold {top['threshold']:.4g} ({top['threshold_from']}): TPR "
        f"{fmt_ci(top['tpr'], top['tpr_low'], top['tpr_high'])}, FPR "
        f"{fmt_ci(top['fpr'], top['fpr_low'], top['fpr_high'])}{target}",
        "  " + baseline_sentence(top, "on these prompts") + f" Text baseline: {top['text_baseline']}.",
        "  " + margin_sentence(top["kind"], top["text_margin"], top["text_margin_low"], top["text_margin_high"]),
    ]
    stability = stability_sentence(top.get("stability"), "Stability in training")
    if stability:
        lines.append(f"  {stability}")
    return lines
