"""Run a study and write its directory: :func:`study`, the library twin of ``attnscan study``.

Steps, in order (each one's wall time goes to ``study.json``):

1. ``scan``: :func:`attnscan.pipeline.run` on the study model and the ``compare`` models with ``detect=True``,
   written to ``scan/`` (figure with one row per model, layer profile with detection, report, detectors).
2. ``behaviour``: greedy answers to the bare harmful requests.
3. ``defence``: the unmodified model and every bypass setting on the same jailbreak and benign prompts: the
   detector's ``bypass_top`` best layers (by grouped cross-validated AUROC; these are the flagged layers when
   enough are flagged), the sweep over that ranking, and ``random_draws`` random sets of as many layers, drawn
   from the other layers with the seed.
4. ``judge``: the refusal judge's precision and recall on the hand-labelled responses.

The directory appears complete or not at all; see :data:`FILES` for what it holds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_dir, check_output_dir, now_utc, write_json
from .._types import ProgressFn
from .._version import __version__
from ..behaviour.arms import ArmOptions, DefenceArm, run_arm
from ..behaviour.generation import GenerationOptions, generate_with
from ..behaviour.judge_check import agreement_table, judge_agreement, label_table, load_judge_labels
from ..behaviour.judges import DEFAULT_MATCHER, ClassifierJudge
from ..behaviour.layers import layer_order
from ..behaviour.runs import Tracker, save_jsonl
from ..detect.store import load_trained, model_record
from ..models.loading import LoadedModel, LoadOptions, resolve_model
from ..pipeline import run
from ..rundir import DETECTOR_DIR
from .plan import StudyOptions, StudySets, study_sets
from .report import study_markdown
from .tables import defence_rows, paper_table, refusal_table

__all__ = ["FILES", "MANIFEST", "StudyResult", "study"]

MANIFEST = "study.json"
FORMAT = "attnscan.study"
FILES = {
    MANIFEST: "what ran: model, options, prompt sets, the bypassed layers and why, timings",
    "study.md": "the report section: every table below in words, with the paper's numbers beside ours",
    "refusal.csv": "refusal rates with Wilson intervals: bare harmful, jailbreak (per family), benign (plain, risky)",
    "defence.csv": "one row per bypass setting: refusals, jailbreaks blocked, benign kept, chrF, perplexity",
    "paper.csv": "the paper's 78 % / 94 % beside this study's defence and the random-layer controls",
    "judge.csv": "the refusal judge's precision and recall on the hand-labelled responses, overall and per model",
    "judge_labels.csv": "how the refusal judge called the responses of each hand label (e.g. confused answers)",
    "tradeoff.png": "jailbreak refusal against benign retention: the sweep, the defence and the random controls",
    "responses.jsonl": "every prompt and answer, with the setting and the refusal call",
    "scan/": "the attention scan and detectors of attnscan run (figure.png, layers.png, report.html, ...)",
}
StageFn = Callable[[str], None]


@dataclass
class StudyResult:
    """What :func:`study` measured; the same tables are in the directory ``out``."""

    out: Path
    refusal: pd.DataFrame
    defence: pd.DataFrame
    paper: pd.DataFrame
    judge: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    observations: list[str] = field(default_factory=list)


def _defence_layers(detection: pd.DataFrame, primary: str, top: int) -> tuple[list[int], list[int], str]:
    """The detector's layer ranking (by its primary kind's grouped AUROC), the layers the defence bypasses, and
    why those."""
    order = layer_order(detection, f"{primary}_auroc")
    flagged = []
    if "flagged" in detection.columns:
        flagged = [int(x) for x in detection.loc[detection["flagged"].astype(bool), "layer"]]
    chosen = sorted(order[:top])
    ranked = f"the {top} layers with the highest grouped cross-validated {primary} AUROC"
    if len(flagged) >= top:
        why = f"{ranked}, all flagged ({len(flagged)} flagged)"
    elif flagged:
        why = f"{ranked}; only {len(flagged)} reached the flagging threshold"
    else:
        why = f"{ranked}; no layer reached the flagging threshold"
    return order, chosen, why


def _random_draws(n_layers: int, chosen: Sequence[int], draws: int, seed: int) -> list[tuple[int, ...]]:
    pool = [x for x in range(n_layers) if x not in set(chosen)]
    k = min(len(chosen), len(pool))
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(pool, k))) for _ in range(draws)] if k else []


@dataclass
class _Clock:
    seconds: dict[str, float] = field(default_factory=dict)
    on_stage: StageFn | None = None

    def start(self, name: str) -> float:
        if self.on_stage is not None:
            self.on_stage(name)
        return time.perf_counter()

    def stop(self, name: str, t0: float) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 1)


def _behaviour(
    loaded: LoadedModel, sets: StudySets, gen: GenerationOptions, progress: ProgressFn | None
) -> tuple[list[str], list[bool]]:
    """The unmodified model's answers to the bare harmful requests and the refusal calls."""
    tracker = Tracker(progress, len(sets.harmful))
    answers = generate_with(loaded, sets.harmful.texts, gen, tracker.stage("harmful (bare)"), "harmful")
    return answers, [DEFAULT_MATCHER.is_refusal(a) for a in answers]


def _arms(
    loaded: LoadedModel,
    sets: StudySets,
    plan: Mapping[str, tuple[int, ...]],
    opts: ArmOptions,
    progress: ProgressFn | None,
) -> dict[str, DefenceArm]:
    """Run every distinct bypass setting once (the baseline first) and return one arm per role."""
    settings = list(dict.fromkeys(plan.values()))
    tracker = Tracker(progress, opts.arm_items(sets.jailbreak, sets.benign) * len(settings))
    by_layers = {
        s: run_arm(loaded, "baseline" if not s else "bypass", s, sets.jailbreak, sets.benign, opts, tracker)
        for s in settings
    }
    return {role: by_layers[layers] for role, layers in plan.items()}


def _records(
    sets: StudySets,
    harmful_answers: Sequence[str],
    harmful_flags: Sequence[bool],
    plan: Mapping[str, tuple[int, ...]],
    arms: Mapping[str, DefenceArm],
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    groups: Sequence[Mapping[str, Any]] = sets.harmful.groups or [{}] * len(sets.harmful)
    for i, (prompt, answer, flag) in enumerate(zip(sets.harmful.texts, harmful_answers, harmful_flags, strict=True)):
        out.append(
            {
                "setting": "baseline",
                "layers": [],
                "set": "harmful",
                "index": i,
                **_ids(groups[i]),
                "prompt": prompt,
                "response": answer,
                "refusal": flag,
            }
        )
    done: set[tuple[int, ...]] = set()
    for role, layers in plan.items():
        if layers in done:
            continue
        done.add(layers)
        arm = arms[role]
        for name, ps, answers, flags in (
            ("jailbreak", sets.jailbreak, arm.jailbreak_responses, arm.jailbreak_refusals),
            ("benign", sets.benign, arm.benign_responses, arm.benign_refusals),
        ):
            ps_groups: Sequence[Mapping[str, Any]] = ps.groups or [{}] * len(ps)
            for i, (prompt, answer, flag) in enumerate(zip(ps.texts, answers, flags, strict=True)):
                out.append(
                    {
                        "setting": role,
                        "layers": list(layers),
                        "set": name,
                        "index": i,
                        **_ids(ps_groups[i]),
                        "prompt": prompt,
                        "response": answer,
                        "refusal": flag,
                    }
                )
    return out


def _ids(groups: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("request_id", "template_id", "family", "category", "looks_risky")
    return {k: groups[k] for k in keys if k in groups}


def _judge_tables(judge: ClassifierJudge | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The phrase judge (and the classifier ``judge``, when given) against the packaged hand labels: rates per
    scope, and calls per hand label, one block of rows per judge (column ``judge``)."""
    records = load_judge_labels()
    judges: list[tuple[str, Any]] = [("phrases", DEFAULT_MATCHER)]
    if judge is not None:
        judges.append((judge.spec, judge))
    rates, labels = [], []
    for name, each in judges:
        result = judge_agreement(records, each)
        rates.append(agreement_table(result).assign(judge=name))
        labels.append(label_table(result).assign(judge=name))
    first = ["judge"]
    rate_table, label_calls = pd.concat(rates, ignore_index=True), pd.concat(labels, ignore_index=True)
    return (
        rate_table[first + [c for c in rate_table.columns if c not in first]],
        label_calls[first + [c for c in label_calls.columns if c not in first]],
    )


# Long (about 90 lines) because it is the study's one sequence of steps, each a call into another stage; splitting
# it would only move the shared state (directory, clock, plan) into arguments.
def study(
    model: str | LoadedModel,
    *,
    out: str | Path,
    options: StudyOptions | None = None,
    load: LoadOptions | None = None,
    overwrite: bool = False,
    judge: ClassifierJudge | None = None,
    progress: ProgressFn | None = None,
    on_stage: StageFn | None = None,
) -> StudyResult:
    """Run the study (module docstring) on ``model`` and write the directory ``out`` (see :data:`FILES`).

    ``options`` sets the sizes (:class:`~attnscan.study.plan.StudyOptions`), ``load`` how models load. ``judge``
    (a :class:`~attnscan.behaviour.judges.ClassifierJudge`) labels every defence answer beside the phrase judge
    (its columns in ``defence.csv``) and is scored on the hand labels too (``judge.csv``).
    ``progress(done, total, label)`` hears about each step's items and ``on_stage(name)`` about each step.
    """
    opts = options or StudyOptions()
    load = load or LoadOptions()
    final = Path(out)
    check_output_dir(final, overwrite, marker=MANIFEST, what="study results")
    sets = study_sets(opts)
    started, clock = now_utc(), _Clock(on_stage=on_stage)
    loaded = resolve_model(model, load)
    compare = [spec for spec in opts.compare if spec != loaded.spec]
    gen = GenerationOptions(opts.max_new_tokens, opts.batch_size)
    with atomic_dir(final, overwrite, marker=MANIFEST, what="study results") as tmp:
        t0 = clock.start("scan")
        scanned = run(
            [loaded, *compare],
            out=tmp / "scan",
            limit=opts.scan_limit,
            length=opts.length,
            seed=opts.seed,
            detect=True,
            dpi=opts.dpi,
            progress=progress,
            load=load,
        )
        clock.stop("scan", t0)
        label = next(iter(scanned.results))
        trained = load_trained(tmp / "scan" / label / DETECTOR_DIR)
        order, chosen, why = _defence_layers(trained.table, trained.primary, opts.bypass_top)

        t0 = clock.start("behaviour")
        harmful_answers, harmful_flags = _behaviour(loaded, sets, gen, progress)
        clock.stop("behaviour", t0)

        t0 = clock.start("defence")
        plan: dict[str, tuple[int, ...]] = {"defence": tuple(chosen)}
        plan |= {f"sweep k={k}": tuple(sorted(order[:k])) for k in opts.sweep if k <= len(order)}
        n_layers = loaded.arch.n_layers
        draws = _random_draws(n_layers, chosen, opts.random_draws, opts.seed)
        plan |= {f"random {i + 1}": layers for i, layers in enumerate(draws)}
        arm_opts = ArmOptions.make(sets.benign, gen, ppl_texts=None, ppl_length=512, matcher=None, judge=judge)
        arms = _arms(loaded, sets, {"baseline": (), **plan}, arm_opts, progress)
        clock.stop("defence", t0)
        baseline = arms.pop("baseline")
        defence = defence_rows(baseline, arms)
        refusal = refusal_table(
            sets.harmful,
            harmful_flags,
            sets.jailbreak,
            baseline.jailbreak_refusals,
            sets.benign,
            baseline.benign_refusals,
        )
        paper = paper_table(defence)

        t0 = clock.start("judge")
        agreement, judge_labels = _judge_tables(judge)
        clock.stop("judge", t0)

        manifest = {
            "format": FORMAT,
            "attnscan_version": __version__,
            "model": model_record(loaded),
            "compare": compare,
            "options": {k: v for k, v in asdict(opts).items() if k != "extra"},
            "prompt_sets": sets.provenance(),
            "defence": {
                "layers": chosen,
                "why": why,
                "ranking": order,
                "ranked_by": f"{trained.primary}_auroc (grouped CV)",
            },
            "random_layers": [list(d) for d in draws],
            "sweep": {k: list(v) for k, v in plan.items() if k.startswith("sweep")},
            "seconds": clock.seconds,
            "started": started,
            "finished": now_utc(),
            "files": FILES,
        }
        refusal.to_csv(tmp / "refusal.csv", index=False, float_format="%.6g")
        defence.to_csv(tmp / "defence.csv", index=False, float_format="%.6g")
        paper.to_csv(tmp / "paper.csv", index=False)
        agreement.to_csv(tmp / "judge.csv", index=False, float_format="%.6g")
        judge_labels.to_csv(tmp / "judge_labels.csv", index=False, float_format="%.6g")
        save_jsonl(
            tmp / "responses.jsonl",
            _records(sets, harmful_answers, harmful_flags, {"baseline": (), **plan}, {"baseline": baseline, **arms}),
        )
        _trade_off(defence, tmp / "tradeoff.png", opts.dpi, label)
        (tmp / "study.md").write_text(
            study_markdown(label, manifest, refusal, defence, paper, agreement, scanned.observations), encoding="utf-8"
        )
        write_json(tmp / MANIFEST, manifest)
    return StudyResult(final, refusal, defence, paper, agreement, manifest, list(scanned.observations))


def _trade_off(defence: pd.DataFrame, path: Path, dpi: int, label: str) -> None:
    from ..views.saving import save_figure
    from ..views.tradeoff import trade_off_figure

    sweep = defence.loc[defence["role"].isin(["baseline"]) | defence["role"].str.startswith("sweep")]
    sweep = sweep.drop_duplicates(subset=["layers"]).sort_values("k")
    marked = defence.loc[(defence["role"] == "defence") | defence["role"].str.startswith("random")]
    fig = trade_off_figure(sweep, title=f"{label}: layer bypass, top-ranked vs random layers", marked=marked)
    save_figure(fig, path, dpi=dpi)
