"""``scan``: prompt sets in, ScanResult out. The library twin of ``attnscan scan``."""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import now_utc
from .._types import DEFAULT_FLOOR, NoticeFn, ProgressFn, int_ranges, refuse_leftovers, take_options
from .._version import __version__
from ..engine import distributed
from ..engine.accumulate import Align, GridCollector, check_align, check_floor
from ..engine.batching import PaddingSide, estimate_batch_size, pad_token_id, run_collect
from ..engine.capture import CaptureInfo
from ..engine.checkpoint import Interrupted, checkpoint_file, load_checkpoint, stop_on_signals, try_save_checkpoint
from ..errors import AttnscanError
from ..models.loading import LoadedModel, LoadOptions, resolve_model
from ..prompts.encoding import DEFAULT_LENGTH, Encoded, Truncate, check_truncate, encode, shared_prefix, warn_truncated
from ..prompts.sets import MIN_STAT_PROMPTS, SHORT_PROMPT_TOKENS, PromptSet, PromptSource, load_prompts
from .lengths import LengthMatch, check_tolerance, match_lengths
from .result import ScanResult


def _auto_batch_size(loaded: LoadedModel, opts: ScanOptions, layers: int) -> int:
    """The first batch size of ``--batch-size auto`` (capturing ``layers`` layers): 8 on the CPU; on CUDA as many
    prompts as :func:`attnscan.engine.batching.estimate_batch_size` expects to fit the free memory (at most
    :data:`~attnscan.engine.batching.AUTO_BATCH_CAP`); 64 on other accelerators. Back-off corrects it either way."""
    device = loaded.device
    if device.type == "cpu":
        return 8
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    config, arch = loaded.model.config, loaded.arch
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * arch.hidden_size
    )
    return estimate_batch_size(
        heads=arch.n_heads,
        hidden=arch.hidden_size,
        intermediate=int(intermediate),
        length=opts.length,
        dtype_bytes=loaded.dtype.itemsize,
        free_bytes=int(free),
        layers=layers,
        whole_maps=opts.align == "relative" or opts.padding_side == "left",
    )


@dataclass(frozen=True)
class ScanOptions:
    """What a scan captures and how (checked when made; every field is also a keyword of :func:`scan`).

    ``layers``: ``"all"``, ``"3,7,18"``, ``"3-7"`` or a list. ``length``: the grid's T. ``batch_size``: prompts per
    forward, ``None`` for automatic (8 on the CPU; on CUDA the estimate of what fits, halved after an out-of-memory
    error). ``chat_template``/``system_prompt``/``truncate``: how prompts are encoded
    (:func:`attnscan.prompts.encoding.encode`). ``padding_side``: where a batch pads. ``align``: ``absolute`` (token
    i on row i) or ``relative`` (each prompt stretched over the grid). ``floor``: of the log statistics.
    ``summary_blocks``: per-prompt block summaries per side. ``seed``: torch's seed. ``checkpoint`` (a directory),
    ``checkpoint_every`` (batches) and ``resume``: see :func:`scan`. ``match_length``: scan only prompts paired by
    token length across the sets, each partner within ``match_tolerance`` (a share of the jailbreak prompt's length,
    at least 2 tokens) of its jailbreak prompt (:mod:`attnscan.analysis.lengths`).
    """

    layers: str | Sequence[int] | None = "all"
    length: int = DEFAULT_LENGTH
    batch_size: int | None = 8
    chat_template: bool = True
    system_prompt: str | None = None
    truncate: Truncate = "head"
    padding_side: PaddingSide = "right"
    align: Align = "absolute"
    floor: float = DEFAULT_FLOOR
    summary_blocks: int = 16
    seed: int = 0
    checkpoint: str | Path | None = None
    checkpoint_every: int = 20
    resume: bool = False
    match_length: bool = False
    match_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise AttnscanError(f"--length must be a positive number of tokens, got {self.length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise AttnscanError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.checkpoint_every < 1:
            raise AttnscanError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.resume and self.checkpoint is None:
            raise AttnscanError("--resume needs --checkpoint DIR (the directory the interrupted scan saved to)")
        check_floor(self.floor)
        check_truncate(self.truncate)
        check_align(self.align)
        check_tolerance(self.match_tolerance)
        if self.padding_side not in ("right", "left"):
            raise AttnscanError(f"--padding-side must be right or left, got {self.padding_side}")


def scan(
    model: str | LoadedModel,
    benign: PromptSource,
    jailbreak: PromptSource,
    control: PromptSource | None = None,
    *,
    options: ScanOptions | None = None,
    load: LoadOptions | None = None,
    progress: ProgressFn | None = None,
    on_notice: NoticeFn | None = None,
    **keywords: Any,
) -> ScanResult:
    """Capture head-averaged attention of ``model`` on each prompt set over a ``length x length`` token grid.

    ``model`` is a spec for :func:`attnscan.load_model` (loaded with ``load``) or an already loaded model. Prompt
    sources are anything :func:`attnscan.load_prompts` reads. ``options`` say what is captured and how
    (:class:`ScanOptions`); any field of it or of :class:`~attnscan.models.loading.LoadOptions` may also be given as
    a keyword (``scan(m, b, j, layers="3,7", dtype="bfloat16")``), overriding the objects. Returns a
    :class:`ScanResult` whose manifest records how it was made.

    ``progress(done, total, label)`` is told the prompts done over all sets; ``on_notice`` hears about back-off and
    resuming. With ``checkpoint`` (a directory) the accumulators are saved atomically every ``checkpoint_every``
    batches and when SIGTERM or SIGINT arrives (the scan then stops with
    :class:`attnscan.engine.checkpoint.Interrupted`); ``resume=True`` continues from that checkpoint, refusing one
    made with other settings. Under ``torchrun`` (``WORLD_SIZE > 1``) each process scans a shard of every set and
    the accumulators are summed across processes; every process returns the whole result.

    With ``match_length`` only prompts paired by token length are scanned (:func:`attnscan.analysis.lengths.
    match_lengths`; an :class:`~attnscan.errors.AttnscanError` when fewer than 2 pairs exist, a warning when less
    than half of a set is kept); the manifest's ``length_matching`` records the pairs and the length distributions
    before and after, and the kept prompts keep their indices in their sets (``prompt_ids``).
    """
    started = now_utc()
    opts = take_options(ScanOptions, options, keywords)
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("scan", keywords)
    sources: dict[str, PromptSource] = {"benign": benign, "jailbreak": jailbreak}
    if control is not None:
        sources["control"] = control
    sets = {name: load_prompts(src, name=name) for name, src in sources.items()}
    if distributed.requested() and load.device == "auto" and load.device_map is None:
        load = dataclasses.replace(load, device=str(distributed.local_device()))
    loaded = resolve_model(model, load)
    chosen = loaded.check_layers(opts.layers)
    torch.manual_seed(opts.seed)
    encoded = {name: _encode(loaded, ps, opts) for name, ps in sets.items()}
    matched = _match(encoded, opts)
    if matched is not None and (note := matched.warning()) is not None:
        warnings.warn(note, stacklevel=2)
    kept = matched.kept if matched is not None else {n: tuple(range(len(e.ids))) for n, e in encoded.items()}
    for name, ps in sets.items():  # a loop, not a comprehension: the warnings' stack levels point at the caller
        _warn_set(ps, _subset(encoded[name], kept[name]), opts)
    rank, world = distributed.setup(loaded.device)
    collectors = {
        name: GridCollector(
            name,
            chosen,
            len(enc.ids),
            opts.length,
            floor=opts.floor,
            n_blocks=opts.summary_blocks,
            device=loaded.device,
            align=opts.align,
        )
        for name, enc in encoded.items()
    }
    settings = _checkpoint_settings(loaded, opts, chosen, sets, world)
    if matched is not None:  # the same sets scanned in part: a resume must keep the same prompts
        settings["length_matching"] = {"tolerance": opts.match_tolerance, "kept": matched.kept}
    t0 = time.perf_counter()
    info = CaptureInfo()
    size = _collect(loaded, encoded, kept, collectors, opts, settings, (rank, world), progress, on_notice, info)
    if info.eager and on_notice is not None:
        on_notice(eager_notice(info.eager))
    for collector in collectors.values():
        distributed.reduce_collector(collector)
    accs = {}
    for name in list(collectors):  # one set's working sums at a time beside the results
        accs[name] = collectors.pop(name).result()
    scanned = {name: _subset(enc, kept[name]) for name, enc in encoded.items()}
    manifest = _manifest(loaded, opts, chosen, sets, scanned, world, size, time.perf_counter() - t0)
    manifest["eager_fallback"] = {str(layer): reason for layer, reason in sorted(info.eager.items())}
    if matched is not None:
        manifest["length_matching"] = matched.record()
    return ScanResult(accs, {**manifest, "started": started, "finished": now_utc()})


def eager_notice(eager: Mapping[int, str]) -> str:
    """The notice for captured layers that ran eager attention (layer -> reason), e.g. ``layers 0–25 ran eager
    attention (logit soft-capping): exact, but slower and holding every head's T x T weights``."""
    by_reason: dict[str, list[int]] = {}
    for layer, reason in sorted(eager.items()):
        by_reason.setdefault(reason, []).append(layer)
    parts = [f"{int_ranges(layers)} ({reason})" for reason, layers in by_reason.items()]
    noun = "layer" if len(eager) == 1 else "layers"
    return (
        f"{noun} {'; '.join(parts)} ran eager attention instead of the chunked path: the maps are exact, but those "
        "layers are slower and hold every head's T x T weights at once"
    )


def _encode(loaded: LoadedModel, ps: PromptSet, opts: ScanOptions) -> Encoded:
    """One set's token ids on the grid."""
    return encode(
        loaded.tokenizer,
        ps.texts,
        opts.length,
        chat_template=opts.chat_template,
        system_prompt=opts.system_prompt,
        truncate=opts.truncate,
    )


def _match(encoded: Mapping[str, Encoded], opts: ScanOptions) -> LengthMatch | None:
    """The prompts paired by length (``match_length``), else None."""
    if not opts.match_length:
        return None
    return match_lengths(
        {name: enc.lengths for name, enc in encoded.items()},
        opts.match_tolerance,
        truncated={name: enc.truncated for name, enc in encoded.items()},
        grid=opts.length,
    )


def _subset(enc: Encoded, kept: Sequence[int]) -> Encoded:
    """The prompts ``kept`` of an encoded set (all of them when nothing was left out)."""
    if len(kept) == len(enc.ids):
        return enc
    return Encoded(tuple(enc.ids[i] for i in kept), tuple(enc.full_lengths[i] for i in kept), enc.chat_template)


def _warn_set(ps: PromptSet, enc: Encoded, opts: ScanOptions) -> None:
    """Warn about the scanned prompts of a set (``enc``): too few, too short, or cut to the grid."""
    if len(enc.ids) < MIN_STAT_PROMPTS:
        warnings.warn(
            f"set '{ps.name}' has only {len(enc.ids)} prompts: the statistics need at least {MIN_STAT_PROMPTS} "
            "per set to say much",
            stacklevel=3,
        )
    short = sum(1 for n in enc.lengths if n < SHORT_PROMPT_TOKENS)
    if short:
        warnings.warn(
            f"{short} of {len(enc.ids)} {ps.name} prompts are shorter than {SHORT_PROMPT_TOKENS} tokens", stacklevel=3
        )
    warn_truncated(enc, opts.length, opts.truncate, f"{ps.name} prompts", stacklevel=4)


def _checkpoint_settings(
    loaded: LoadedModel,
    opts: ScanOptions,
    chosen: Sequence[int],
    sets: Mapping[str, PromptSet],
    world: int,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (a resume with other settings is refused)."""
    return {
        "model": loaded.spec,
        "weights": loaded.source.get("gguf_sha256")
        or loaded.source.get("resolved_revision")
        or loaded.source.get("revision"),
        "dtype": str(loaded.dtype),
        "layers": list(chosen),
        "length": opts.length,
        "align": opts.align,
        "floor": opts.floor,
        "summary_blocks": opts.summary_blocks,
        "chat_template": opts.chat_template,
        "system_prompt": opts.system_prompt,
        "truncate": opts.truncate,
        "padding_side": opts.padding_side,
        "batch_size": opts.batch_size,
        "sets": {name: ps.sha256 for name, ps in sets.items()},
        "world_size": world,
    }


def _collect(
    loaded: LoadedModel,
    encoded: Mapping[str, Encoded],
    kept: Mapping[str, Sequence[int]],
    collectors: Mapping[str, GridCollector],
    opts: ScanOptions,
    settings: dict[str, Any],
    place: tuple[int, int],
    progress: ProgressFn | None,
    on_notice: NoticeFn | None,
    info: CaptureInfo,
) -> int:
    """Run this process's shard of the ``kept`` prompts of every set through the model into the collectors
    (``place``: this process's rank and the world size), checkpointing as asked.

    Returns the batch size in use at the end (automatic sizes may have halved)."""
    rank, world = place
    mine = {name: [ids[i] for i in distributed.shard(len(ids), rank, world)] for name, ids in kept.items()}
    ckpt = checkpoint_file(opts.checkpoint, rank) if opts.checkpoint is not None else None
    done = 0
    if opts.resume and ckpt is not None:
        if ckpt.is_file():
            done = load_checkpoint(ckpt, settings, collectors)
            if on_notice is not None:
                on_notice(f"resuming from {ckpt}: {done} prompts already scanned")
        elif on_notice is not None:
            on_notice(f"no checkpoint at {ckpt}: starting from the beginning")
    total = sum(len(ids) for ids in mine.values())
    layers = max(len(c.layers) for c in collectors.values())
    size = opts.batch_size if opts.batch_size is not None else _auto_batch_size(loaded, opts, layers)
    pad = pad_token_id(loaded.tokenizer, loaded.model)
    batches = 0
    last_saved = True  # a failed checkpoint save warns once, not again at every batch until a save succeeds
    with stop_on_signals(ckpt is not None) as stop:
        for name, enc in encoded.items():
            collector = collectors[name]
            todo = [i for i in mine[name] if not bool(collector.seen[i])]

            def on_batch(n: int, _name: str = name) -> None:
                nonlocal done, batches, last_saved
                done += n
                batches += 1
                saved = True
                if ckpt is not None and (batches % opts.checkpoint_every == 0 or stop):
                    saved = last_saved = try_save_checkpoint(ckpt, settings, collectors, warn=last_saved)
                if stop:
                    kept = "checkpoint saved to" if saved else "this checkpoint could not be saved; the last one is in"
                    raise Interrupted(
                        f"stopped by {stop.signal} after {done} of {total} prompts; {kept} "
                        f"{ckpt.parent if ckpt else '?'}: rerun the same command with --resume to continue"
                    )
                if progress is not None:
                    progress(done, total, _name)

            def on_backoff(old: int, new: int) -> None:
                if on_notice is not None:
                    on_notice(f"out of memory at batch size {old}; continuing with {new}")

            if progress is not None:
                progress(done, total, name)
            size = run_collect(
                loaded.model,
                [enc.ids[i] for i in todo],
                collector,
                route=loaded.arch.route,
                pad_id=pad,
                batch_size=size,
                padding_side=opts.padding_side,
                prompt_ids=todo,
                on_batch=on_batch,
                backoff=opts.batch_size is None,
                on_backoff=on_backoff,
                capture_info=info,
            )
        if ckpt is not None:
            try_save_checkpoint(ckpt, settings, collectors, warn=last_saved)
    return size


def _manifest(
    loaded: LoadedModel,
    opts: ScanOptions,
    chosen: Sequence[int],
    sets: Mapping[str, PromptSet],
    encoded: Mapping[str, Encoded],
    world: int,
    size: int,
    elapsed: float,
) -> dict[str, Any]:
    """How the scan was made: the bundle's ``manifest.json`` (without its start and finish times)."""
    import transformers

    return {
        "attnscan_version": __version__,
        "model": {"spec": loaded.spec, **loaded.source},
        "architecture": loaded.arch.as_dict(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "length": opts.length,
        "alignment": opts.align,
        "statistic": "ln(mean attention probability over heads and prompts)",
        "floor": opts.floor,
        "layers": list(chosen),
        "summary_blocks": opts.summary_blocks,
        "prompt_sets": {
            name: {
                **ps.provenance(),
                "truncated": encoded[name].truncated,
                "tokens_min": min(encoded[name].lengths),
                "tokens_max": max(encoded[name].lengths),
                "tokens_mean": sum(encoded[name].lengths) / len(encoded[name].lengths),
                **({"groups": list(ps.groups)} if ps.groups else {}),
            }
            for name, ps in sets.items()
        },
        "chat_template": all(e.chat_template for e in encoded.values()),
        "shared_prefix_tokens": _decoded_prefix(loaded.tokenizer, [ids for e in encoded.values() for ids in e.ids]),
        "system_prompt": opts.system_prompt,
        "truncate": opts.truncate,
        "padding_side": opts.padding_side,
        "batch_size": opts.batch_size if opts.batch_size is not None else f"auto (ended at {size})",
        "world_size": world,
        "seed": opts.seed,
        "capture_seconds": round(elapsed, 3),
        "command_line": sys.argv,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _decoded_prefix(tokenizer: Any, seqs: Sequence[Sequence[int]], limit: int = 512) -> list[str]:
    """Token texts of the prefix all prompts share (grid positions 0, 1, ...), for hover text in reports."""
    prefix = shared_prefix(seqs)[:limit]
    try:
        return [str(tokenizer.decode([token_id])) for token_id in prefix]
    except Exception:  # a tokenizer that cannot decode single ids: the report then shows positions only
        return []
