"""Readers for prompt files and public benchmark layouts.

Every reader returns the prompt texts and, for each, the group labels read from the columns asked for
(``--groups family=attack,request_id=behavior_id``). Which field holds the prompt is decided in this order:

1. ``field=`` given by the user (``--field``): that column / key, or an error listing the available ones;
2. a recognised public layout, by its columns:

   =====================================  ==========================================  ===========================
   layout                                  recognised by                               prompt taken from
   =====================================  ==========================================  ===========================
   JailbreakBench JBB-Behaviors            ``Goal``, ``Behavior``, ``Category``        ``Goal``
   AdvBench ``harmful_behaviors.csv``      ``goal``, ``target``                        ``goal``
   HarmBench behaviour CSVs                ``Behavior``, ``FunctionalCategory``,       ``Behavior``, after its
                                           ``SemanticCategory``                        ``ContextString`` if any
   in-the-wild jailbreak JSON              a list of strings, or objects with          the string / ``prompt``
                                           ``prompt``
   =====================================  ==========================================  ===========================

3. a single column named like a prompt (``prompt``, ``text``, ``goal``, ``behavior``, ``question``,
   ``instruction``, ``query``, ``input``, ``request``, ``content``, ``template``; case-insensitive).

DAN-style template collections carry placeholders such as ``{generator.name}``; they are filled from
``assistant_name`` (``--assistant-name``, default ``ChatGPT``, the assistant those templates address). A template's
``{request}`` slot is left for composition.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AttnscanError

PROMPT_FIELDS = (
    "prompt",
    "text",
    "template",
    "goal",
    "behavior",
    "question",
    "instruction",
    "query",
    "input",
    "request",
    "content",
)
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"
MAX_FIELD = 1 << 24  # characters in one CSV field: a 16 MiB prompt is past any model's context
_PLACEHOLDER = re.compile(r"\{(generator\.name|generator_name|model_name|assistant_name)\}")


def fill_placeholders(text: str, assistant_name: str) -> str:
    """Replace DAN-style name placeholders (``{generator.name}`` and kin) with ``assistant_name``."""
    return _PLACEHOLDER.sub(assistant_name, text)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AttnscanError(f"{where} line {line} is not valid UTF-8: re-save the file as UTF-8") from None


def _pick_column(columns: Sequence[str], field: str | None, where: str) -> tuple[str, str | None]:
    """Return (prompt column, optional context column) for a table with ``columns``."""
    cols = list(columns)
    shown = ", ".join(cols) if cols else "none"
    if field is not None:
        if field not in cols:
            raise AttnscanError(f"{where} has no column '{field}': available columns are {shown}")
        return field, None
    present = set(cols)
    if {"Goal", "Behavior", "Category"} <= present:  # JailbreakBench JBB-Behaviors
        return "Goal", None
    if {"goal", "target"} <= present:  # AdvBench
        return "goal", None
    if {"Behavior", "FunctionalCategory", "SemanticCategory"} <= present:  # HarmBench
        return "Behavior", ("ContextString" if "ContextString" in present else None)
    lowered = {c.lower(): c for c in cols}
    matches = [lowered[name] for name in PROMPT_FIELDS if name in lowered]
    if matches:
        return matches[0], None
    raise AttnscanError(
        f"cannot tell which column of {where} holds the prompts: pass --field NAME (available columns: {shown})"
    )


Rows = tuple[list[str], list[dict[str, Any]]]
"""Prompt texts and, for each, the group labels read from the columns asked for (empty dicts when none were)."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _rows_to_texts(
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    field: str | None,
    where: str,
    groups: Mapping[str, str] | None = None,
) -> Rows:
    column, context = _pick_column(columns, field, where)
    for label, name in (groups or {}).items():
        if name not in columns:
            raise AttnscanError(
                f"{where} has no column '{name}' for the group label {label}: available columns are "
                f"{', '.join(columns) if columns else 'none'}"
            )
    texts: list[str] = []
    records: list[dict[str, Any]] = []
    for row in rows:
        value = row.get(column)
        if _missing(value):
            continue
        text = str(value)
        ctx = row.get(context) if context else None
        if isinstance(ctx, str) and ctx.strip():
            text = ctx.strip() + HARMBENCH_CONTEXT_SEPARATOR + text
        texts.append(text)
        records.append({label: row.get(name) for label, name in (groups or {}).items() if not _missing(row.get(name))})
    return texts, records


def read_txt(path: Path, multiline: bool = False) -> list[str]:
    """One prompt per line (blank lines skipped), or blank-line-separated blocks with ``multiline``."""
    body = _decode(path.read_bytes(), str(path))
    if multiline:
        blocks = re.split(r"\n\s*\n", body.replace("\r\n", "\n"))
        return [b.strip() for b in blocks if b.strip()]
    return [line.strip() for line in body.splitlines() if line.strip()]


def _records_to_texts(items: list[Any], field: str | None, where: str, groups: Mapping[str, str] | None) -> Rows:
    if all(isinstance(x, str) for x in items):
        if field is not None:
            raise AttnscanError(f"{where} is a list of strings: it has no field '{field}'; drop --field")
        if groups:
            raise AttnscanError(f"{where} is a list of strings: it has no columns for --groups; drop --groups")
        return [str(x) for x in items], [{} for _ in items]
    if not all(isinstance(x, dict) for x in items):
        raise AttnscanError(f"{where} mixes strings and objects: give a list of strings or a list of objects")
    columns: list[str] = []
    for item in items:
        columns.extend(k for k in item if k not in columns)
    return _rows_to_texts(items, columns, field, where, groups)


def read_json(path: Path, field: str | None = None, groups: Mapping[str, str] | None = None) -> Rows:
    """A JSON list of strings or of objects, or an object holding such a list under one key."""
    try:
        data = json.loads(_decode(path.read_bytes(), str(path)))
    except json.JSONDecodeError as exc:
        raise AttnscanError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}): fix the file") from None
    except RecursionError:
        raise AttnscanError(f"{path} nests JSON lists or objects too deeply to read: fix the file") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) != 1:
            raise AttnscanError(
                f"{path} is a JSON object; expected a list of prompts (or an object with exactly one list in it)"
            )
        data = next(iter(lists.values()))
    if not isinstance(data, list):
        raise AttnscanError(f"{path} holds a JSON {type(data).__name__}: give a list of strings or objects")
    return _records_to_texts(data, field, str(path), groups)


def read_jsonl(path: Path, field: str | None = None, groups: Mapping[str, str] | None = None) -> Rows:
    """One JSON string or object per line."""
    items = []
    for number, line in enumerate(_decode(path.read_bytes(), str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AttnscanError(f"{path} line {number} is not valid JSON ({exc.msg}): fix the line") from None
        except RecursionError:
            raise AttnscanError(f"{path} line {number} nests JSON too deeply to read: fix the line") from None
    return _records_to_texts(items, field, str(path), groups) if items else ([], [])


def read_table(
    path: Path, field: str | None = None, delimiter: str | None = None, groups: Mapping[str, str] | None = None
) -> Rows:
    """CSV or TSV with a header row."""
    body = _decode(path.read_bytes(), str(path))
    delim = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(io.StringIO(body, newline=""), delimiter=delim)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, MAX_FIELD))  # prompts longer than csv's default 128 KiB field are legitimate
    try:
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:  # line_num counts the lines of the rows read whole: the bad row starts on the next
        raise AttnscanError(f"{path} line {reader.line_num + 1} cannot be read as CSV ({exc}): fix the file") from None
    finally:
        csv.field_size_limit(limit)
    if not columns:
        return [], []
    return _rows_to_texts(rows, columns, field, str(path), groups)


def read_parquet(path: Path, field: str | None = None, groups: Mapping[str, str] | None = None) -> Rows:
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
    except ImportError:
        raise AttnscanError("reading .parquet needs pyarrow: pip install pyarrow") from None
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid (a ValueError) for damaged or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttnscanError(f"{path} is not a readable parquet file ({first}): fix or re-export the file") from None
    return _rows_to_texts(frame.to_dict("records"), [str(c) for c in frame.columns], field, str(path), groups)


def read_hf(spec: str) -> tuple[list[str], str]:
    """``hf:DATASET[:CONFIG]:SPLIT:COLUMN`` through the ``datasets`` library (hub id or local dataset folder)."""
    parts = spec.split(":")[1:]
    if len(parts) == 3:
        dataset, config, split, column = parts[0], None, parts[1], parts[2]
    elif len(parts) == 4:
        dataset, config, split, column = parts
    else:
        raise AttnscanError(
            f"cannot read '{spec}': write hf:DATASET[:CONFIG]:SPLIT:COLUMN, e.g. hf:org/set:train:prompt"
        )
    try:
        import datasets
    except ImportError:
        raise AttnscanError("hf: sources need the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types for missing data, splits and network failures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttnscanError(f"cannot load dataset '{dataset}' split '{split}': {first}") from None
    if column not in ds.column_names:
        raise AttnscanError(
            f"dataset '{dataset}' has no column '{column}': available columns are {', '.join(ds.column_names)}"
        )
    return [str(x) for x in ds[column] if x is not None], dataset


READERS = {".txt": "txt", ".json": "json", ".jsonl": "jsonl", ".csv": "table", ".tsv": "table", ".parquet": "parquet"}


def read_file(path: Path, field: str | None = None, multiline: bool = False) -> list[str]:
    """Read prompts from a file, choosing the reader by extension."""
    return read_file_rows(path, field, multiline)[0]


def read_file_rows(
    path: Path, field: str | None = None, multiline: bool = False, groups: Mapping[str, str] | None = None
) -> Rows:
    """Read prompts from a file, choosing the reader by extension, with each prompt's group labels taken from the
    columns ``groups`` names (label -> column; a missing column is refused with the list of columns)."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise AttnscanError(
            f"cannot read {path}: unsupported extension '{path.suffix}'; "
            "use .txt, .json, .jsonl, .csv, .tsv or .parquet"
        )
    if kind == "txt":
        if field is not None:
            raise AttnscanError(f"{path} is plain text: it has no field '{field}'; drop --field")
        if groups:
            raise AttnscanError(f"{path} is plain text: it has no columns for --groups; drop --groups")
        texts = read_txt(path, multiline)
        return texts, [{} for _ in texts]
    if kind == "json":
        return read_json(path, field, groups)
    if kind == "jsonl":
        return read_jsonl(path, field, groups)
    if kind == "parquet":
        return read_parquet(path, field, groups)
    return read_table(path, field, groups=groups)
