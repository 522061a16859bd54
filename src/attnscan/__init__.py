"""attnscan: layer-by-layer attention shifts of language models under jailbreak prompts."""

from __future__ import annotations

__version__ = "0.1.0"

from .accumulate import GridCollector, SetAccumulator
from .arch import ArchEntry, ArchFacts, arch_facts, register_arch
from .capture import capture_attention
from .detect import CPDetector, ProbeDetector, layer_detection_table
from .detect_job import TrainedDetector, evaluate_detector, load_trained, score_prompts, train_detector
from .errors import AttnscanError
from .models import EMBEDDED_NAME, LoadedModel, from_model, load_model
from .plot import FigureRow, grid_figure, layer_profile_figure
from .prompts import PromptSet, encode, load_prompts
from .result import ScanResult
from .run import RunOutput, make_report, run
from .scan import scan
from .stats import VerdictThresholds, effects_table, layer_table, observations

__all__ = [
    "EMBEDDED_NAME",
    "ArchEntry",
    "ArchFacts",
    "AttnscanError",
    "CPDetector",
    "FigureRow",
    "GridCollector",
    "LoadedModel",
    "ProbeDetector",
    "PromptSet",
    "RunOutput",
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
