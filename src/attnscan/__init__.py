"""attnscan: layer-by-layer attention shifts of language models under jailbreak prompts.

The public names below are imported on first use (PEP 562), so that ``import attnscan`` and ``attnscan --help``
do not pay for torch, transformers and pandas until a name that needs them is touched."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .analysis.observations import observations
    from .analysis.result import ScanResult
    from .analysis.scan import ScanOptions, scan
    from .analysis.statistics import VerdictThresholds, effects_table, layer_table
    from .detect.detectors import CPDetector, ProbeDetector
    from .detect.jobs import evaluate_detector, score_prompts, train_detector
    from .detect.metrics import layer_detection_table
    from .detect.store import TrainedDetector, load_trained
    from .engine.accumulate import GridCollector, SetAccumulator
    from .engine.capture import capture_attention
    from .errors import AttnscanError
    from .models.arch import ArchEntry, ArchFacts, arch_facts, register_arch
    from .models.loading import EMBEDDED_NAME, LoadedModel, LoadOptions, from_model, load_model
    from .pipeline import RunOutput, make_report, run
    from .prompts.encoding import encode
    from .prompts.sets import PromptSet, load_prompts
    from .views.grid import FigureRow, grid_figure
    from .views.profile import layer_profile_figure

_LAZY: dict[str, str] = {
    "observations": ".analysis.observations",
    "ScanResult": ".analysis.result",
    "ScanOptions": ".analysis.scan",
    "scan": ".analysis.scan",
    "VerdictThresholds": ".analysis.statistics",
    "effects_table": ".analysis.statistics",
    "layer_table": ".analysis.statistics",
    "CPDetector": ".detect.detectors",
    "ProbeDetector": ".detect.detectors",
    "evaluate_detector": ".detect.jobs",
    "score_prompts": ".detect.jobs",
    "train_detector": ".detect.jobs",
    "layer_detection_table": ".detect.metrics",
    "TrainedDetector": ".detect.store",
    "load_trained": ".detect.store",
    "GridCollector": ".engine.accumulate",
    "SetAccumulator": ".engine.accumulate",
    "capture_attention": ".engine.capture",
    "AttnscanError": ".errors",
    "ArchEntry": ".models.arch",
    "ArchFacts": ".models.arch",
    "arch_facts": ".models.arch",
    "register_arch": ".models.arch",
    "EMBEDDED_NAME": ".models.loading",
    "LoadedModel": ".models.loading",
    "LoadOptions": ".models.loading",
    "from_model": ".models.loading",
    "load_model": ".models.loading",
    "RunOutput": ".pipeline",
    "make_report": ".pipeline",
    "run": ".pipeline",
    "encode": ".prompts.encoding",
    "PromptSet": ".prompts.sets",
    "load_prompts": ".prompts.sets",
    "FigureRow": ".views.grid",
    "grid_figure": ".views.grid",
    "layer_profile_figure": ".views.profile",
}

__all__ = [
    "EMBEDDED_NAME",
    "ArchEntry",
    "ArchFacts",
    "AttnscanError",
    "CPDetector",
    "FigureRow",
    "GridCollector",
    "LoadOptions",
    "LoadedModel",
    "ProbeDetector",
    "PromptSet",
    "RunOutput",
    "ScanOptions",
    "ScanResult",
    "SetAccumulator",
    "TrainedDetector",
    "VerdictThresholds",
    "__version__",
    "arch_facts",
    "capture_attention",
    "effects_table",
    "encode",
    "evaluate_detector",
    "from_model",
    "grid_figure",
    "layer_detection_table",
    "layer_profile_figure",
    "layer_table",
    "load_model",
    "load_prompts",
    "load_trained",
    "make_report",
    "observations",
    "register_arch",
    "run",
    "scan",
    "score_prompts",
    "train_detector",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
