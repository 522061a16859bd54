"""attnscan: layer-by-layer attention shifts of language models under jailbreak prompts."""

from __future__ import annotations

from ._version import __version__
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
