"""ScanResult: the accumulators of a scan plus how it was made, and the on-disk results bundle.

Bundle layout (the public contract; a notebook reads it with ``safetensors`` and ``json`` alone):

``manifest.json``
    attnscan version, model spec and provenance, architecture facts, dtype, device, grid length T, alignment,
    statistic, floor, captured layers, prompt sets (name, source, count and sha256 of the whole set; token lengths
    of the prompts scanned), chat template on/off, seed, command line and timestamps; after ``--match-length`` also
    ``length_matching`` (:meth:`attnscan.analysis.lengths.LengthMatch.record`: method, caliper, pairs, prompts kept
    per set and the length distributions before and after).
``maps.safetensors``
    for each set S: ``S/count`` int32 [T, T] prompts reaching each cell (the same for every layer; 0 above the
    diagonal in absolute alignment), and for each captured layer L ``S/L{L}/mean`` float32 [T, T] mean attention
    probability over heads and prompts (NaN where no prompt contributes); and ``diff/L{L}`` float32 [T, T] =
    jailbreak log map - benign log map, NaN where either is NaN. The log map itself is not stored: it is
    ``ln(max(mean, e^floor))`` (floor in the manifest), NaN where the mean is NaN (:meth:`ScanResult.log`).
``accumulators.safetensors``
    attnscan's own merge state (:meth:`attnscan.engine.accumulate.SetAccumulator.tensors`): for each set S,
    ``S/cells`` the flat indices ``i * T + j`` of the cells some prompt reaches, ``S/sums`` float64 [layers, cells]
    and ``S/count`` int64 [cells] for those cells only (every other cell is zero), and the per-prompt summaries;
    :meth:`ScanResult.load` rebuilds the full [layers, T, T] sums, so shards merge exactly.
``layers.csv``
    one row per captured layer.

``manifest.json`` holds ``bundle_format``: 2 for this layout. Version 1 (attnscan before the compact bundle) stored
``S/L{L}/count`` and ``S/L{L}/log`` for every layer in the maps, and the full [layers, T, T] sums and [T, T] count
in the accumulators; :meth:`ScanResult.load` reads both versions.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import BUNDLE_MARKER, atomic_dir, reading, write_json
from ..engine.accumulate import SetAccumulator
from ..errors import AttnscanError
from .statistics import layer_table

BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
SET_ORDER = ("benign", "jailbreak", "control")


@dataclass
class ScanResult:
    """Accumulators for each prompt set over the captured layers, with the manifest that says how they were made."""

    sets: dict[str, SetAccumulator]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)
    """The bundle directory this result was loaded from, if any."""

    def __post_init__(self) -> None:
        if not self.sets:
            raise AttnscanError("a scan result needs at least one prompt set")
        first = next(iter(self.sets.values()))
        for acc in self.sets.values():
            if acc.layers != first.layers or acc.length != first.length or acc.floor != first.floor:
                raise AttnscanError("all sets of a scan result must share layers, length and floor")

    @property
    def layers(self) -> tuple[int, ...]:
        return next(iter(self.sets.values())).layers

    @property
    def length(self) -> int:
        return next(iter(self.sets.values())).length

    @property
    def floor(self) -> float:
        return next(iter(self.sets.values())).floor

    def _set(self, name: str) -> SetAccumulator:
        if name not in self.sets:
            raise AttnscanError(f"set '{name}' is not in this result: it has {', '.join(self.sets)}")
        return self.sets[name]

    def mean(self, set_name: str, layer: int) -> torch.Tensor:
        """``float64 [T, T]`` mean attention probability over heads and prompts, NaN where no prompt contributes."""
        return self._set(set_name).mean(layer)

    def count(self, set_name: str) -> torch.Tensor:
        """``int64 [T, T]`` number of prompts reaching each cell (the same for every layer)."""
        return self._set(set_name).count

    def log(self, set_name: str, layer: int) -> torch.Tensor:
        """``float64 [T, T]`` ln(mean) floored at the floor; NaN where no prompt contributes."""
        mean = self.mean(set_name, layer)
        return torch.log(mean.clamp_min(math.exp(self.floor))).where(~mean.isnan(), mean)

    def diff(self, layer: int, a: str = "jailbreak", b: str = "benign") -> torch.Tensor:
        """``float64 [T, T]`` log map of ``a`` minus that of ``b``; NaN where either is NaN."""
        return self.log(a, layer) - self.log(b, layer)

    def merge(self, other: ScanResult) -> ScanResult:
        """Combine two shards of the same scan (disjoint prompts of the same sets)."""
        if set(self.sets) != set(other.sets):
            raise AttnscanError("cannot merge scan results with different prompt sets")
        merged = {k: self.sets[k].merge(other.sets[k]) for k in self.sets}
        return ScanResult(merged, dict(self.manifest))

    def maps(self) -> dict[str, torch.Tensor]:
        """The tensors of ``maps.safetensors`` (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.sets:
            out[f"{name}/count"] = self.count(name).to(torch.int32)
            for layer in self.layers:
                out[f"{name}/L{layer}/mean"] = self.mean(name, layer).float()
        if "benign" in self.sets and "jailbreak" in self.sets:
            for layer in self.layers:
                out[f"diff/L{layer}"] = self.diff(layer).float()
        return {k: v.contiguous() for k, v in out.items()}

    def layer_rows(self) -> list[dict[str, Any]]:
        """Simple per-layer means over the causal cells both sets reach (the analysis adds statistics)."""
        rows = []
        names = [n for n in SET_ORDER if n in self.sets] or list(self.sets)
        for layer in self.layers:
            row: dict[str, Any] = {"layer": layer}
            logs = {n: self.log(n, layer) for n in names}
            both = torch.stack([~logs[n].isnan() for n in names]).all(0)
            row["cells"] = int(both.sum())
            for n in names:
                row[f"{n}_mean_log"] = float(logs[n][both].mean()) if row["cells"] else float("nan")
            if "benign" in logs and "jailbreak" in logs:
                d = (logs["jailbreak"] - logs["benign"])[both]
                row["mean_diff"] = float(d.mean()) if d.numel() else float("nan")
                row["mean_abs_diff"] = float(d.abs().mean()) if d.numel() else float("nan")
            rows.append(row)
        return rows

    def layer_table(self, **options: Any) -> Any:
        """The per-layer statistics (:func:`attnscan.analysis.statistics.layer_table`) as a pandas DataFrame."""
        return layer_table(self, **options)

    def save(self, out: str | Path, overwrite: bool = False, table: Any = None) -> Path:
        """Write the results bundle to ``out`` atomically; refuse an existing bundle unless ``overwrite``.

        ``layers.csv`` holds ``table`` (a DataFrame from :func:`attnscan.layer_table`) when given, else the layer
        statistics computed here with their defaults, or plain per-layer means when a set is too small for them.
        """
        out = Path(out)
        if table is None and {"benign", "jailbreak"} <= set(self.sets):
            try:
                table = self.layer_table(seed=int(self.manifest.get("seed", 0)))
            except AttnscanError:
                table = None
        manifest = {**self.manifest, "bundle_format": BUNDLE_FORMAT}
        manifest.setdefault("length", self.length)
        manifest.setdefault("layers", list(self.layers))
        manifest.setdefault("floor", self.floor)
        manifest["sets_order"] = list(self.sets)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            meta = {"format": "attnscan-maps", "bundle_format": str(BUNDLE_FORMAT), "length": str(self.length)}
            save_file(self.maps(), str(tmp / "maps.safetensors"), metadata=meta)
            tensors: dict[str, torch.Tensor] = {}
            for acc in self.sets.values():
                tensors.update(acc.tensors())
            acc_meta = {"format": "attnscan-accumulators", "bundle_format": str(BUNDLE_FORMAT)}
            save_file(tensors, str(tmp / "accumulators.safetensors"), metadata=acc_meta)
            if table is not None:
                table.to_csv(tmp / "layers.csv", index=False, float_format="%.6g")
            else:
                _write_csv(tmp / "layers.csv", self.layer_rows())
            write_json(tmp / BUNDLE_MARKER, manifest)
        return out

    @classmethod
    def load(cls, path: str | Path) -> ScanResult:
        """Read a bundle written by :meth:`save`."""
        path = Path(path)
        manifest_path = path / BUNDLE_MARKER
        if not manifest_path.is_file():
            raise AttnscanError(f"{path} is not an attnscan results bundle (no {BUNDLE_MARKER}): check the path")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AttnscanError(f"{manifest_path} is not valid JSON ({exc}): the bundle is damaged") from None
        if not isinstance(manifest, dict):
            raise AttnscanError(f"{manifest_path} is not a JSON object: the bundle is damaged; scan again")
        acc_path = path / "accumulators.safetensors"
        if not acc_path.is_file():
            raise AttnscanError(f"{path} has no accumulators.safetensors: the bundle is incomplete; scan again")
        version = manifest.get("bundle_format", 1)
        if version not in READABLE_FORMATS:
            raise AttnscanError(
                f"{path} is a bundle of format {version}; this attnscan reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}: upgrade attnscan"
            )
        # A damaged file fails its reader with any exception type (see attnscan._io.reading): one line for all.
        with reading(path, "results bundle", "scan again (or restore the directory from a copy)"):
            tensors = load_file(str(acc_path))
            layers = tuple(int(x) for x in manifest["layers"])
            sets = {
                name: SetAccumulator.from_tensors(
                    name, tensors, layers, int(manifest["length"]), float(manifest["floor"])
                )
                for name in manifest["sets_order"]
            }
        return cls(sets, manifest, path=path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
