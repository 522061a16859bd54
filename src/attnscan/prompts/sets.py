"""Prompt sets, their sources and composition from templates (encoding onto the token grid: :mod:`.encoding`).

A :class:`PromptSet` is a name, the texts, and where they came from (source string, count, sha256 of the texts),
so every result can say exactly which prompts produced it.

Sources (``SRC`` on the command line):

- ``builtin:NAME``: sets shipped with attnscan, written by its authors (``src/attnscan/prompts/data/sets/README.md``):
  ``benign``, ``harmful``, ``templates`` (jailbreak wrappers with a ``{request}`` slot), the composed
  ``jailbreak`` (templates x harmful) and ``control`` (templates x benign: same wrappers, benign requests), and
  the small ``demo-benign`` / ``demo-jailbreak``;
- a file: ``.txt`` (one prompt per line, or blank-line-separated blocks with ``multiline``), ``.json``,
  ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``, with public benchmark layouts recognised by their columns
  (:mod:`attnscan.prompts.loaders`) and ``field`` to pick a column;
- ``hf:DATASET[:CONFIG]:SPLIT:COLUMN`` through the ``datasets`` library (hub id or a local dataset folder).

``limit`` with ``seed`` takes a deterministic subsample (the same seed gives the same prompts in the same order).
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import AttnscanError
from . import loaders

REQUEST_SLOT = "{request}"
MIN_STAT_PROMPTS = 10
SHORT_PROMPT_TOKENS = 8


GROUP_KEYS = ("template_id", "family", "request_id", "category", "looks_risky")
"""The per-prompt group labels attnscan knows: which wrapper (template and its family), which request (and its
category), and for benign requests whether they look risky. Cross-validation holds out whole groups of them."""

SPAN_KEYS = ("request_start", "request_end")
"""Character offsets of the request inside a composed prompt (``text[start:end]`` is the request)."""


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompt texts with provenance and optional per-prompt labels.

    ``groups`` is empty or holds one dict per text with any of :data:`GROUP_KEYS` (template id and family, request
    id, category, looks-risky) and, for composed prompts, :data:`SPAN_KEYS`. The built-in sets and
    :func:`compose` fill it; it travels through subsampling, and into bundles, feature files and detectors.
    """

    name: str
    texts: tuple[str, ...]
    source: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)
    groups: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.texts:
            raise AttnscanError(f"prompt set '{self.name}' from {self.source} is empty: give at least one prompt")
        if self.groups and len(self.groups) != len(self.texts):
            raise AttnscanError(
                f"prompt set '{self.name}' has {len(self.texts)} texts but {len(self.groups)} group records"
            )

    def group(self, key: str) -> list[Any] | None:
        """Every prompt's value of the group label ``key`` (``None`` where a prompt lacks it), or ``None`` when no
        prompt of the set has that label."""
        if not any(key in g for g in self.groups):
            return None
        return [g.get(key) for g in self.groups]

    def request_span(self, i: int) -> tuple[int, int] | None:
        """Character span of prompt ``i``'s request when composition knows it."""
        if not self.groups or "request_start" not in self.groups[i]:
            return None
        return int(self.groups[i]["request_start"]), int(self.groups[i]["request_end"])

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        """sha256 of the texts (JSON list, UTF-8): equal sets give equal hashes whatever file they came from."""
        return hashlib.sha256(json.dumps(list(self.texts), ensure_ascii=False).encode("utf-8")).hexdigest()

    def provenance(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "source": self.source,
            "count": len(self.texts),
            "sha256": self.sha256,
            **self.details,
        }
        labels = sorted({k for g in self.groups for k in g if k in GROUP_KEYS})
        if labels:
            out["group_labels"] = labels
        return out


PromptSource = str | Path | Sequence[str] | PromptSet
"""Anything :func:`load_prompts` reads: ``builtin:NAME``, ``hf:...``, a file path, a list of texts or a PromptSet."""


def as_prompt_set(src: PromptSource, name: str) -> PromptSet:
    """``src`` itself when it is a PromptSet, else :func:`load_prompts` of it named ``name``."""
    return src if isinstance(src, PromptSet) else load_prompts(src, name)


def join_sets(first: PromptSet, second: PromptSet, name: str) -> PromptSet:
    """``first`` then ``second`` as one set (their group labels kept; a prompt without labels gets none)."""
    groups: tuple[dict[str, Any], ...] = ()
    if first.groups or second.groups:
        groups = (first.groups or tuple({} for _ in first.texts)) + (second.groups or tuple({} for _ in second.texts))
    source = f"{first.source} + {second.source}"
    details = {"parts": [first.provenance(), second.provenance()]}
    return PromptSet(name, first.texts + second.texts, source, details, groups)


def warn_unmatched_control(jailbreak: PromptSet, control: PromptSet, stacklevel: int = 3) -> None:
    """Warn when a control set shares no jailbreak template with the jailbreak set: it then cannot make a
    detector look past the wrappers (its point is the same wrappers around harmless requests)."""
    jb, ctl = jailbreak.group("template_id"), control.group("template_id")
    if jb is None or ctl is None:
        warnings.warn(
            f"the control set '{control.name}' ({control.source}) or the jailbreak set carries no template labels, "
            "so attnscan cannot check that both use the same templates; compose both from the same templates "
            "(--jailbreak-templates, builtin:control) so the detector must look past the wrappers",
            stacklevel=stacklevel,
        )
    elif not ({t for t in jb if t is not None} & {t for t in ctl if t is not None}):
        warnings.warn(
            f"the control set '{control.name}' shares no template with the jailbreak set: it cannot teach the "
            "detector to look past the wrappers; compose it from the jailbreak set's templates",
            stacklevel=stacklevel,
        )


def _data_root() -> Any:
    return resources.files("attnscan.prompts") / "data"


def _read_builtin_jsonl(name: str) -> list[dict[str, Any]]:
    body = (_data_root() / "sets" / f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in body.splitlines() if line.strip()]


BUILTIN_COMPOSED = {"jailbreak": "harmful", "control": "benign"}


def builtin_names() -> list[str]:
    """Names accepted after ``builtin:``."""
    names = {p.name[: -len(".txt")] for p in _data_root().iterdir() if p.name.endswith(".txt")}
    sets = _data_root() / "sets"
    if sets.is_dir():
        names |= {p.name[: -len(".jsonl")] for p in sets.iterdir() if p.name.endswith(".jsonl")}
        names |= set(BUILTIN_COMPOSED)
    return sorted(names)


def builtin_records(name: str) -> list[dict[str, Any]]:
    """The records of a built-in JSONL set (``benign``, ``harmful`` or ``templates``), with their categories."""
    if name not in ("benign", "harmful", "templates"):
        raise AttnscanError(f"'{name}' is not a built-in record set: use benign, harmful or templates")
    return _read_builtin_jsonl(name)


def _builtin(key: str, name: str | None) -> PromptSet:
    available = builtin_names()
    if key not in available:
        raise AttnscanError(f"unknown built-in set '{key}': choose one of {', '.join(available)}")
    if key in BUILTIN_COMPOSED:
        templates = _builtin("templates", "templates")
        requests = _builtin(BUILTIN_COMPOSED[key], "requests")
        return compose(templates, requests, name=name or key, source=f"builtin:{key}")
    if key in ("benign", "harmful", "templates"):
        records = _read_builtin_jsonl(key)
        if key == "templates":
            texts = [r["template"] for r in records]
            groups = tuple({"template_id": r["id"], "family": r["family"]} for r in records)
        else:
            texts = [r["text"] for r in records]
            groups = tuple(
                {"request_id": r["id"], "category": r["category"]}
                | ({"looks_risky": bool(r["looks_risky"])} if "looks_risky" in r else {})
                for r in records
            )
        return PromptSet(name or key, tuple(texts), f"builtin:{key}", groups=groups)
    else:
        body = (_data_root() / f"{key}.txt").read_text(encoding="utf-8")
        texts = [line.strip() for line in body.splitlines() if line.strip()]
    return PromptSet(name or key, tuple(texts), f"builtin:{key}")


def subsample(prompts: PromptSet, limit: int | None, seed: int = 0) -> PromptSet:
    """A deterministic subsample of at most ``limit`` prompts (kept in their original order); the one place that
    checks ``--limit``."""
    if limit is not None and limit < 1:
        raise AttnscanError(f"--limit must be at least 1, got {limit}")
    if limit is None or limit >= len(prompts):
        return prompts
    picked = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    details = {**prompts.details, "limit": limit, "seed": seed, "of": len(prompts)}
    groups = tuple(prompts.groups[i] for i in picked) if prompts.groups else ()
    return PromptSet(prompts.name, tuple(prompts.texts[i] for i in picked), prompts.source, details, groups)


def compose(
    templates: Sequence[str] | PromptSet,
    requests: Sequence[str] | PromptSet,
    name: str = "jailbreak",
    source: str | None = None,
) -> PromptSet:
    """Every template with every request in its ``{request}`` slot (template-major order).

    Each composed prompt is labelled with its template's and its request's groups (``template_id`` and ``family``,
    ``request_id``, ``category``, ``looks_risky`` where the inputs carry them; a plain list gets ``template_id``
    ``t1, t2, ...`` and ``request_id`` ``r1, r2, ...``) and with the character span of the request inside it.
    """
    tpl_set = templates if isinstance(templates, PromptSet) else PromptSet("templates", tuple(templates), "<memory>")
    req_set = requests if isinstance(requests, PromptSet) else PromptSet("requests", tuple(requests), "<memory>")
    bad = [i for i, t in enumerate(tpl_set.texts) if t.count(REQUEST_SLOT) != 1]
    if bad:
        count = tpl_set.texts[bad[0]].count(REQUEST_SLOT)
        has = "no" if count == 0 else str(count)
        raise AttnscanError(
            f"template {bad[0] + 1} has {has} {REQUEST_SLOT} slot{'s' if count > 1 else ''}: every jailbreak "
            "template needs exactly one"
        )
    texts: list[str] = []
    groups: list[dict[str, Any]] = []
    for i, template in enumerate(tpl_set.texts):
        head, tail = template.split(REQUEST_SLOT)
        tpl_groups = tpl_set.groups[i] if tpl_set.groups else {}
        for j, request in enumerate(req_set.texts):
            texts.append(head + request + tail)
            groups.append(
                {"template_id": f"t{i + 1}", "request_id": f"r{j + 1}"}
                | tpl_groups
                | (req_set.groups[j] if req_set.groups else {})
                | {"request_start": len(head), "request_end": len(head) + len(request)}
            )
    src = source or f"compose({len(tpl_set)} templates x {len(req_set)} requests)"
    return PromptSet(name, tuple(texts), src, {"templates": len(tpl_set), "requests": len(req_set)}, tuple(groups))


def load_prompts(
    src: str | Path | Sequence[str] | PromptSet,
    name: str | None = None,
    *,
    field: str | None = None,
    multiline: bool = False,
    assistant_name: str = "ChatGPT",
    limit: int | None = None,
    seed: int = 0,
    groups: str | Mapping[str, str] | None = None,
) -> PromptSet:
    """Load a prompt set from a source (see the module docstring), a list of texts, or pass a PromptSet through.

    ``groups`` (``"family=attack,request_id=behavior_id"`` or a mapping) names the file columns that hold the
    prompts' group labels (:data:`GROUP_KEYS`); the built-in sets carry their own and ignore it. Warns when the
    set holds duplicates (with their count); raises :class:`AttnscanError` when it is empty or cannot be read.
    """
    columns = parse_groups(groups)
    if isinstance(src, PromptSet):
        ps = src
    elif not isinstance(src, (str, Path)):
        ps = PromptSet(name or "prompts", tuple(str(t) for t in src), "<memory>")
    else:
        ps = _load_source(
            str(src), name, field=field, multiline=multiline, assistant_name=assistant_name, groups=columns
        )
    ps = subsample(ps, limit, seed)
    duplicates = len(ps.texts) - len(set(ps.texts))
    if duplicates:
        warnings.warn(f"set '{ps.name}' from {ps.source} holds {duplicates} duplicate prompts", stacklevel=2)
    return ps


def parse_groups(groups: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"family=attack,request_id=behavior_id"`` (or a mapping) -> ``{label: column}``, labels among
    :data:`GROUP_KEYS`."""
    if groups is None:
        return {}
    if isinstance(groups, str):
        pairs: dict[str, str] = {}
        for part in (p.strip() for p in groups.split(",") if p.strip()):
            label, sep, column = part.partition("=")
            if not sep or not label.strip() or not column.strip():
                raise AttnscanError(f"cannot read --groups part '{part}': write LABEL=COLUMN, e.g. family=attack")
            pairs[label.strip()] = column.strip()
        groups = pairs
    unknown = [label for label in groups if label not in GROUP_KEYS]
    if unknown:
        raise AttnscanError(f"unknown group label '{unknown[0]}' in --groups: use {', '.join(GROUP_KEYS)}")
    return dict(groups)


def _load_source(
    src: str, name: str | None, *, field: str | None, multiline: bool, assistant_name: str, groups: Mapping[str, str]
) -> PromptSet:
    if src.startswith("builtin:"):
        return _builtin(src.split(":", 1)[1], name)
    records: list[dict[str, Any]] | None = None
    if src.startswith("hf:"):
        if groups:
            raise AttnscanError("--groups reads file columns; it does not apply to hf: sources")
        texts, dataset = loaders.read_hf(src)
        stem = dataset.rstrip("/").split("/")[-1]
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise AttnscanError(f"prompt file not found: {src}: check the path")
        if path.is_dir():
            raise AttnscanError(f"{src} is a directory: give a prompt file (.txt, .json, .jsonl, .csv, .tsv, .parquet)")
        texts, records = loaders.read_file_rows(path, field=field, multiline=multiline, groups=groups or None)
        stem = path.stem
        src = str(path)
    filled = [loaders.fill_placeholders(t, assistant_name).strip() for t in texts]
    kept = [i for i, t in enumerate(filled) if t]
    if not kept:
        raise AttnscanError(f"{src} holds no prompts: check the file, or pick the right column with --field")
    labels = tuple(_label_values(records[i]) for i in kept) if records is not None and groups else ()
    return PromptSet(name or stem, tuple(filled[i] for i in kept), src, groups=labels)


def _label_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """Group labels from file cells: ``looks_risky`` as a boolean, the others as text."""
    out: dict[str, Any] = {}
    for label, value in record.items():
        if label == "looks_risky":
            out[label] = str(value).strip().lower() in ("1", "true", "yes", "y")
        else:
            out[label] = str(value)
    return out


def prompt_sets(
    benign: PromptSource | None,
    jailbreak: PromptSource | None = None,
    control: PromptSource | None = None,
    *,
    jailbreak_templates: str | Path | None = None,
    requests: str | Path | None = None,
    field: str | None = None,
    multiline: bool = False,
    assistant_name: str = "ChatGPT",
    limit: int | None = None,
    seed: int = 0,
    groups: str | Mapping[str, str] | None = None,
) -> dict[str, PromptSet]:
    """The named sets of a scan: ``benign``, ``jailbreak`` and optionally ``control``.

    ``jailbreak`` may instead be composed from ``jailbreak_templates`` x ``requests`` (default
    ``builtin:harmful``). ``limit``/``seed`` subsample each set deterministically. ``groups`` names the columns of
    the benign, jailbreak and control files that hold group labels (see :func:`load_prompts`); composed prompts are
    labelled by composition.
    """
    opts: dict[str, Any] = {"field": field, "multiline": multiline, "assistant_name": assistant_name}
    if benign is None:
        raise AttnscanError("no benign prompts: pass --benign SRC (e.g. builtin:benign or a file)")
    sets = {"benign": load_prompts(benign, "benign", **opts, limit=limit, seed=seed, groups=groups)}
    if jailbreak_templates is not None:
        if jailbreak is not None:
            raise AttnscanError("give either --jailbreak or --jailbreak-templates (with --requests), not both")
        tpl = load_prompts(jailbreak_templates, "templates", **opts)
        req = load_prompts(requests if requests is not None else "builtin:harmful", "requests", **opts)
        composed = compose(tpl, req, name="jailbreak", source=f"compose({tpl.source} x {req.source})")
        sets["jailbreak"] = subsample(composed, limit, seed)
    elif jailbreak is not None:
        if requests is not None:
            raise AttnscanError("--requests only applies with --jailbreak-templates")
        sets["jailbreak"] = load_prompts(jailbreak, "jailbreak", **opts, limit=limit, seed=seed, groups=groups)
    else:
        raise AttnscanError("no jailbreak prompts: pass --jailbreak SRC or --jailbreak-templates FILE")
    if control is not None:
        sets["control"] = load_prompts(control, "control", **opts, limit=limit, seed=seed, groups=groups)
    return sets
