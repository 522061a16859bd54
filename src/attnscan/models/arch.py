"""Architecture facts as data: a registry keyed by config class, with a warning fallback.

Every causal LM in transformers exposes its dimensions through its config, but under different names and with
different attention layouts (grouped-query heads, sliding windows on some or all layers). This module turns a
config into :class:`ArchFacts`, the few numbers the rest of attnscan needs, and says which capture route applies:

- ``"interface"``: the model calls attention through transformers' ``AttentionInterface``; attnscan registers its
  own attention function (softmax weights for the chosen layers, SDPA for the rest).
- ``"hooks"``: the model computes attention itself (eager) and returns the weights from its attention modules;
  attnscan reduces them in a forward hook and drops them at once.

Known architectures are listed in :data:`ARCHITECTURES`; add one with :func:`register_arch`. An architecture that
is not listed still works when its config follows transformers' conventions; it gets a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

Route = Literal["interface", "hooks"]


@dataclass(frozen=True)
class ArchEntry:
    """What attnscan knows about one config class.

    ``route`` forces a capture route; ``None`` picks ``"interface"`` when the model class supports transformers'
    attention interface and ``"hooks"`` otherwise. ``verified`` marks architectures the test suite checks against
    the eager reference.
    """

    route: Route | None = None
    verified: bool = False
    notes: str = ""


ARCHITECTURES: dict[str, ArchEntry] = {
    "LlamaConfig": ArchEntry(verified=True, notes="GQA, llama3 rope scaling"),
    "MistralConfig": ArchEntry(verified=True, notes="sliding window on every layer"),
    "Gemma3TextConfig": ArchEntry(verified=True, notes="sliding and full layers interleaved"),
    "GPTJConfig": ArchEntry(verified=True, notes="on the attention interface since transformers 5"),
    "GPT2Config": ArchEntry(verified=True),
    "GPTNeoConfig": ArchEntry(route="hooks", verified=True, notes="eager only; local layers"),
    "Qwen2Config": ArchEntry(),
    "Qwen3Config": ArchEntry(),
    "Phi3Config": ArchEntry(),
    "GPTNeoXConfig": ArchEntry(),
    "Gemma2Config": ArchEntry(notes="attention logit soft-capping"),
}


def register_arch(config_class_name: str, entry: ArchEntry) -> None:
    """Add or replace the registry entry for a config class (e.g. ``"MyModelConfig"``)."""
    ARCHITECTURES[config_class_name] = entry


@dataclass(frozen=True)
class ArchFacts:
    """Dimensions and attention layout of a causal LM.

    ``layer_windows[i]`` is the sliding-window size of layer ``i`` (``None`` for full causal attention).
    """

    config_class: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    layer_windows: tuple[int | None, ...] = field(default=())
    route: Route = "interface"
    known: bool = True

    @property
    def sliding_window(self) -> int | None:
        """The smallest sliding window of any layer, or ``None`` when every layer attends to the full prefix."""
        windows = [w for w in self.layer_windows if w is not None]
        return min(windows) if windows else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "config_class": self.config_class,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "sliding_window": self.sliding_window,
            "layer_windows": list(self.layer_windows),
            "route": self.route,
            "known": self.known,
        }


def _layer_windows(config: Any, n_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == n_layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    attention_layers = getattr(config, "attention_layers", None)  # GPT-Neo: "global" / "local"
    if attention_layers is not None and len(attention_layers) == n_layers:
        local = getattr(config, "window_size", None)
        return tuple(local if t == "local" else None for t in attention_layers)
    if window is not None and getattr(config, "use_sliding_window", True):
        return (int(window),) * n_layers
    return (None,) * n_layers


def arch_facts(config: Any, supports_interface: bool | None = None) -> ArchFacts:
    """Read :class:`ArchFacts` from a transformers config.

    ``supports_interface`` is the model class's ``_supports_attention_backend`` flag when known; it decides the
    route for architectures the registry leaves open.
    """
    name = type(config).__name__
    entry = ARCHITECTURES.get(name)
    if entry is None:
        warnings.warn(
            f"attnscan has not been verified on {name} ({getattr(config, 'model_type', '?')}); "
            "facts are read from the config's standard fields. Check one layer against "
            "output_attentions=True before trusting a full scan.",
            stacklevel=2,
        )
        entry = ArchEntry()
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    route: Route
    if entry.route is not None:
        route = entry.route
    elif supports_interface is None:
        route = "interface"
    else:
        route = "interface" if supports_interface else "hooks"
    return ArchFacts(
        config_class=name,
        model_type=str(getattr(config, "model_type", "")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=hidden,
        layer_windows=_layer_windows(config, n_layers),
        route=route,
        known=name in ARCHITECTURES,
    )
