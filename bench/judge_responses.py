"""Regenerate the raw responses behind ``attnscan/behaviour/data/judge_labels.jsonl``.

The packaged label file holds hand labels of greedy responses from two models to a fixed subsample of the built-in
prompt sets. This script reproduces those responses (full length, unredacted) so that anyone can check a label
or label the same prompts again:

    HF_HUB_OFFLINE=1 python bench/judge_responses.py --out /tmp/judge_raw.jsonl

Each output line is ``{"id", "model", "prompt_kind", "prompt_ids", "prompt", "response"}``; ``id`` matches the
packaged file. The selection: ``builtin:harmful`` (bare requests), ``builtin:jailbreak`` (templates x harmful),
``builtin:benign`` split into ordinary requests (``benign``) and requests that only look risky
(``risky_benign``), each subsampled with :func:`attnscan.prompts.sets.subsample` and the seed below. Generation:
:func:`attnscan.behaviour.generation.generate`, greedy, chat template on, no system prompt, 64 new tokens.
The responses to harmful requests may contain harmful text: keep the output file private.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from attnscan.behaviour.generation import generate
from attnscan.models.loading import load_model
from attnscan.prompts.sets import PromptSet, load_prompts, subsample

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
SEED = 13
COUNTS = {"harmful": 18, "jailbreak": 20, "benign": 7, "risky_benign": 10}
MAX_NEW_TOKENS = 64
ID_KEYS = ("request_id", "template_id")


def _only(ps: PromptSet, risky: bool) -> PromptSet:
    keep = [i for i, g in enumerate(ps.groups) if bool(g.get("looks_risky")) == risky]
    groups = tuple(ps.groups[i] for i in keep)
    return PromptSet(ps.name, tuple(ps.texts[i] for i in keep), ps.source, groups=groups)


def selection() -> dict[str, PromptSet]:
    """The prompts of each kind, in a fixed order (the same for both models)."""
    benign = load_prompts("builtin:benign")
    return {
        "harmful": load_prompts("builtin:harmful", limit=COUNTS["harmful"], seed=SEED),
        "jailbreak": load_prompts("builtin:jailbreak", limit=COUNTS["jailbreak"], seed=SEED),
        "benign": subsample(_only(benign, risky=False), COUNTS["benign"], SEED),
        "risky_benign": subsample(_only(benign, risky=True), COUNTS["risky_benign"], SEED),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file for the raw responses")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    sets = selection()
    rows: list[dict[str, Any]] = []
    for spec in args.models.split(","):
        started = time.perf_counter()
        loaded = load_model(spec, device="cpu")
        tag = "smollm2" if spec.startswith("smollm2") else "qwen"
        for kind, ps in sets.items():
            responses = generate(loaded, ps, max_new_tokens=MAX_NEW_TOKENS, batch_size=args.batch_size)
            for i, (prompt, response) in enumerate(zip(ps.texts, responses, strict=True)):
                ids = {k: ps.groups[i][k] for k in ID_KEYS if k in ps.groups[i]}
                rows.append(
                    {
                        "id": f"{tag}-{kind}-{i + 1:02d}",
                        "model": spec,
                        "prompt_kind": kind,
                        "prompt_ids": ids,
                        "prompt": prompt,
                        "response": response,
                    }
                )
        print(f"{spec}: {time.perf_counter() - started:.0f} s")
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} responses to {args.out}")


if __name__ == "__main__":
    main()
