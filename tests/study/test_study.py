"""`attnscan study` end to end on a tiny random-weight model: the directory, and its numbers recomputed from the
answers it saved."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from attnscan.behaviour.judges import DEFAULT_MATCHER
from attnscan.cli.main import app
from attnscan.models.loading import LoadedModel, from_model
from attnscan.study.experiment import FILES, study
from attnscan.study.plan import StudyOptions
from attnscan.testing.tiny import build_model, tiny_tokenizer

runner = CliRunner()
PLAN = StudyOptions(
    requests=4,
    wraps=2,
    benign=4,
    scan_limit=10,
    length=288,
    compare=(),
    sweep=(1, 2),
    bypass_top=1,
    random_draws=2,
    max_new_tokens=4,
    dpi=60,
)


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


@pytest.fixture(scope="module")
def done(llama: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s") / "study"
    stages: list[str] = []
    result = study(llama, out=out, options=PLAN, on_stage=stages.append)
    assert stages == ["scan", "behaviour", "defence", "judge"]
    assert result.out == out
    return out


def test_the_directory_holds_every_file(done: Path) -> None:
    names = {p.name + ("/" if p.is_dir() else "") for p in done.iterdir()}
    assert names == set(FILES)
    assert (done / "scan" / "figure.png").is_file() and (done / "scan" / "tiny-llama" / "detector").is_dir()
    manifest = json.loads((done / "study.json").read_text())
    assert set(manifest["seconds"]) == {"scan", "behaviour", "defence", "judge"}
    assert manifest["options"]["requests"] == 4 and manifest["model"]["spec"] == "tiny-llama"


def test_defence_layers_come_from_the_detector_and_random_layers_avoid_them(done: Path) -> None:
    manifest = json.loads((done / "study.json").read_text())
    detection = pd.read_csv(done / "scan" / "tiny-llama" / "detector" / "detection.csv")
    primary = json.loads((done / "scan" / "tiny-llama" / "detector" / "detector.json").read_text())["meta"]["primary"]
    assert manifest["defence"]["ranked_by"].startswith(primary)
    best = detection.sort_values(f"{primary}_auroc", ascending=False, kind="stable")["layer"].tolist()[:1]
    assert manifest["defence"]["layers"] == sorted(best)
    assert len(manifest["random_layers"]) == 2
    for draw in manifest["random_layers"]:
        assert len(draw) == 1 and not set(draw) & set(best)
    assert manifest["sweep"]["sweep k=2"] == sorted(manifest["defence"]["ranking"][:2])


def test_numbers_recomputed_from_the_saved_answers(done: Path) -> None:
    """Every rate in defence.csv and refusal.csv follows from responses.jsonl and the phrase judge."""
    records = [json.loads(line) for line in (done / "responses.jsonl").read_text().splitlines()]
    for rec in records:
        assert rec["refusal"] == DEFAULT_MATCHER.is_refusal(rec["response"])
    by = {(r["setting"], r["set"], r["index"]): r["refusal"] for r in records}
    defence = pd.read_csv(done / "defence.csv").set_index("role")
    for role in defence.index:
        n_jb = int(defence.loc[role, "jailbreak_n"])
        jb = [by[(role, "jailbreak", i)] for i in range(n_jb)] if (role, "jailbreak", 0) in by else None
        if jb is None:  # a setting with the same layers as an earlier one is saved once
            continue
        base = [by[("baseline", "jailbreak", i)] for i in range(n_jb)]
        assert defence.loc[role, "jailbreak_refusals"] == sum(jb)
        succeeded = [d for b, d in zip(base, jb, strict=True) if not b]
        assert defence.loc[role, "succeeded"] == len(succeeded) and defence.loc[role, "blocked"] == sum(succeeded)
    refusal = pd.read_csv(done / "refusal.csv")
    bare = refusal.loc[(refusal["set"] == "harmful") & (refusal["group"] == "all")].iloc[0]
    assert bare["n"] == 4 and bare["refusals"] == sum(by[("baseline", "harmful", i)] for i in range(4))
    assert len([r for r in records if r["setting"] == "baseline" and r["set"] == "jailbreak"]) == 8


def test_the_report_section_puts_the_paper_beside_our_numbers(done: Path) -> None:
    text = (done / "study.md").read_text()
    assert "| 78% |" in text and "| 94% |" in text and "random layers" in text
    assert "How good is the refusal judge" in text


def test_cli_refuses_a_bad_plan_before_loading_anything(tmp_path: Path) -> None:
    res = runner.invoke(app, ["study", "--model", "no-such-model", "--out", str(tmp_path / "s"), "--sweep", "1,x"])
    assert res.exit_code == 2 and "--sweep takes comma-separated whole numbers" in res.stderr
    res = runner.invoke(app, ["study", "--model", "no-such-model", "--out", str(tmp_path / "s"), "--benign", "1"])
    assert res.exit_code == 2 and "--benign must be at least 2" in res.stderr
    assert not (tmp_path / "s").exists()


def test_an_existing_study_is_not_replaced_without_overwrite(done: Path) -> None:
    res = runner.invoke(app, ["study", "--model", "no-such-model", "--out", str(done)])
    assert res.exit_code == 2 and "--overwrite" in res.stderr


def test_a_classifier_judge_is_scored_on_the_hand_labels_and_labels_the_defence(
    llama: LoadedModel, judge_dir: Path, tmp_path: Path
) -> None:
    from attnscan.behaviour.judge_check import judge_agreement, load_judge_labels
    from attnscan.behaviour.judges import ClassifierJudge

    judge = ClassifierJudge(str(judge_dir), refusal_labels=["refused"])
    plan = StudyOptions(**{**PLAN.__dict__, "sweep": (1,), "random_draws": 1})
    result = study(llama, out=tmp_path / "s", options=plan, judge=judge)
    rates = pd.read_csv(tmp_path / "s" / "judge.csv")
    assert list(rates["judge"].unique()) == ["phrases", str(judge_dir)]
    overall = rates.loc[(rates["judge"] == str(judge_dir)) & (rates["scope"] == "overall")].iloc[0]
    expected = judge_agreement(load_judge_labels(), judge)["overall"]
    assert (overall["tp"], overall["fp"], overall["fn"], overall["tn"]) == tuple(
        expected[k] for k in ("tp", "fp", "fn", "tn")
    )
    defence = pd.read_csv(tmp_path / "s" / "defence.csv")
    assert "jailbreak_judge_refusal_rate" in defence.columns and defence["jailbreak_judge_refusals"].notna().all()
    assert result.judge is not None and len(result.judge) == len(rates)
