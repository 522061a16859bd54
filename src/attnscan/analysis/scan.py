"""``scan``: prompt sets in, ScanResult out. The library twin of ``attnscan scan``."""

from __future__ import annotations

import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import now_utc
from .._types import ProgressFn
from .._version import __version__
from ..engine import distributed
from ..engine.accumulate import DEFAULT_FLOOR, Align, GridCollector, check_align, check_floor
from ..engine.batching import PaddingSide, estimate_batch_size, pad_token_id, run_collect
from ..engine.checkpoint import Interrupted, checkpoint_file, load_checkpoint, save_checkpoint, stop_on_signals
from ..errors import AttnscanError
from ..models.arch import Route
from ..models.loading import LoadedModel, load_model
from ..prompts.encoding import DEFAULT_LENGTH, Truncate, check_truncate, encode, shared_prefix, warn_truncated
from ..prompts.sets import MIN_STAT_PROMPTS, SHORT_PROMPT_TOKENS, PromptSource, load_prompts
from .result import ScanResult

"""``progress(done, total, label)``: prompts done so far over all sets, their total, and what is running."""


def _auto_batch_size(loaded: LoadedModel, length: int) -> int:
    """The first batch size of ``--batch-size auto``: 8 on the CPU; on CUDA as many prompts as
    :func:`attnscan.runner.estimate_batch_size` expects to fit the free memory (at most
    :data:`~attnscan.runner.AUTO_BATCH_CAP`); 64 on other accelerators. Back-off corrects it either way."""
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
        length=length,
        dtype_bytes=loaded.dtype.itemsize,
        free_bytes=int(free),
    )


def scan(
    model: str | LoadedModel,
    benign: PromptSource,
    jailbreak: PromptSource,
    control: PromptSource | None = None,
    *,
    layers: str | Sequence[int] | None = "all",
    length: int = DEFAULT_LENGTH,
    batch_size: int | None = 8,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncate: Truncate = "head",
    padding_side: PaddingSide = "right",
    align: Align = "absolute",
    floor: float = DEFAULT_FLOOR,
    summary_blocks: int = 16,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    route: Route | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 20,
    resume: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> ScanResult:
    """Capture head-averaged attention of ``model`` on each prompt set over a ``length x length`` token grid.

    ``model`` is a spec for :func:`attnscan.load_model` or an already loaded model. Prompt sources are anything
    :func:`attnscan.load_prompts` reads. Returns a :class:`ScanResult` whose manifest records how it was made.

    ``batch_size=None`` picks it automatically: 8 on the CPU; on CUDA it starts at the estimate of what fits the
    free memory (:func:`attnscan.runner.estimate_batch_size`, at most 128; 64 on other accelerators) and halves
    after an out-of-memory error (``on_notice`` is told). With ``checkpoint`` (a directory) the accumulators are saved
    atomically every ``checkpoint_every`` batches and when SIGTERM or SIGINT arrives (the scan then stops with
    :class:`attnscan.checkpoint.Interrupted`); ``resume=True`` continues from that checkpoint, refusing one made
    with other settings. Under ``torchrun`` (``WORLD_SIZE > 1``) each process scans a shard of every set and the
    accumulators are summed across processes; every process returns the whole result.
    """
    started = now_utc()
    if length <= 0:
        raise AttnscanError(f"--length must be a positive number of tokens, got {length}")
    if batch_size is not None and batch_size < 1:
        raise AttnscanError(f"--batch-size must be at least 1, got {batch_size}")
    if checkpoint_every < 1:
        raise AttnscanError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if resume and checkpoint is None:
        raise AttnscanError("--resume needs --checkpoint DIR (the directory the interrupted scan saved to)")
    check_floor(floor)
    check_truncate(truncate)
    check_align(align)
    if padding_side not in ("right", "left"):
        raise AttnscanError(f"--padding-side must be right or left, got {padding_side}")
    sources: dict[str, PromptSource] = {"benign": benign, "jailbreak": jailbreak}
    if control is not None:
        sources["control"] = control
    sets = {name: load_prompts(src, name=name) for name, src in sources.items()}

    if distributed.requested() and device == "auto" and device_map is None:
        device = str(distributed.local_device())
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(
            model,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            revision=revision,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            route=route,
        )
    )
    chosen = loaded.check_layers(
        layers if not isinstance(layers, Sequence) or isinstance(layers, str) else list(layers)
    )
    torch.manual_seed(seed)

    encoded = {
        name: encode(
            loaded.tokenizer,
            ps.texts,
            length,
            chat_template=chat_template,
            system_prompt=system_prompt,
            truncate=truncate,
        )
        for name, ps in sets.items()
    }
    for name, enc in encoded.items():
        if len(enc.ids) < MIN_STAT_PROMPTS:
            warnings.warn(
                f"set '{name}' has only {len(enc.ids)} prompts: the statistics need at least {MIN_STAT_PROMPTS} "
                "per set to say much",
                stacklevel=2,
            )
        short = sum(1 for n in enc.lengths if n < SHORT_PROMPT_TOKENS)
        if short:
            warnings.warn(
                f"{short} of {len(enc.ids)} {name} prompts are shorter than {SHORT_PROMPT_TOKENS} tokens",
                stacklevel=2,
            )
        warn_truncated(enc, length, truncate, f"{name} prompts")
    rank, world = distributed.setup(loaded.device)
    pad = pad_token_id(loaded.tokenizer, loaded.model)
    collectors = {
        name: GridCollector(
            name,
            chosen,
            len(enc.ids),
            length,
            floor=floor,
            n_blocks=summary_blocks,
            device=loaded.device,
            align=align,
        )
        for name, enc in encoded.items()
    }
    size = batch_size if batch_size is not None else _auto_batch_size(loaded, length)
    settings = {
        "model": loaded.spec,
        "weights": loaded.source.get("gguf_sha256")
        or loaded.source.get("resolved_revision")
        or loaded.source.get("revision"),
        "dtype": str(loaded.dtype),
        "layers": list(chosen),
        "length": length,
        "align": align,
        "floor": floor,
        "summary_blocks": summary_blocks,
        "chat_template": chat_template,
        "system_prompt": system_prompt,
        "truncate": truncate,
        "padding_side": padding_side,
        "batch_size": batch_size,
        "sets": {name: ps.sha256 for name, ps in sets.items()},
        "world_size": world,
    }
    ckpt = checkpoint_file(checkpoint, rank) if checkpoint is not None else None
    done = 0
    if resume and ckpt is not None:
        if ckpt.is_file():
            done = load_checkpoint(ckpt, settings, collectors)
            if on_notice is not None:
                on_notice(f"resuming from {ckpt}: {done} prompts already scanned")
        elif on_notice is not None:
            on_notice(f"no checkpoint at {ckpt}: starting from the beginning")
    total = sum(len(distributed.shard(len(e.ids), rank, world)) for e in encoded.values())
    batches = 0
    t0 = time.perf_counter()
    with stop_on_signals(ckpt is not None) as stop:
        for name, enc in encoded.items():
            collector = collectors[name]
            todo = [i for i in distributed.shard(len(enc.ids), rank, world) if not bool(collector.seen[i])]

            def on_batch(n: int, _name: str = name) -> None:
                nonlocal done, batches
                done += n
                batches += 1
                if ckpt is not None and (batches % checkpoint_every == 0 or stop):
                    save_checkpoint(ckpt, settings, collectors)
                if stop:
                    raise Interrupted(
                        f"stopped by {stop.signal} after {done} of {total} prompts; checkpoint saved to "
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
                padding_side=padding_side,
                prompt_ids=todo,
                on_batch=on_batch,
                backoff=batch_size is None,
                on_backoff=on_backoff,
            )
        if ckpt is not None:
            save_checkpoint(ckpt, settings, collectors)
    for collector in collectors.values():
        distributed.reduce_collector(collector)
    accs = {name: c.result() for name, c in collectors.items()}
    elapsed = time.perf_counter() - t0

    import transformers

    manifest: dict[str, Any] = {
        "attnscan_version": __version__,
        "model": {"spec": loaded.spec, **loaded.source},
        "architecture": loaded.arch.as_dict(),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "length": length,
        "alignment": align,
        "statistic": "ln(mean attention probability over heads and prompts)",
        "floor": floor,
        "layers": list(chosen),
        "summary_blocks": summary_blocks,
        "prompt_sets": {
            name: {
                **ps.provenance(),
                "truncated": encoded[name].truncated,
                "tokens_min": min(encoded[name].lengths),
                "tokens_max": max(encoded[name].lengths),
                "tokens_mean": sum(encoded[name].lengths) / len(encoded[name].lengths),
            }
            for name, ps in sets.items()
        },
        "chat_template": all(e.chat_template for e in encoded.values()),
        "shared_prefix_tokens": _decoded_prefix(loaded.tokenizer, [ids for e in encoded.values() for ids in e.ids]),
        "system_prompt": system_prompt,
        "truncate": truncate,
        "padding_side": padding_side,
        "batch_size": batch_size if batch_size is not None else f"auto (ended at {size})",
        "world_size": world,
        "seed": seed,
        "capture_seconds": round(elapsed, 3),
        "command_line": sys.argv,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "started": started,
        "finished": now_utc(),
    }
    return ScanResult(accs, manifest)


def _decoded_prefix(tokenizer: Any, seqs: Sequence[Sequence[int]], limit: int = 512) -> list[str]:
    """Token texts of the prefix all prompts share (grid positions 0, 1, ...), for hover text in reports."""
    prefix = shared_prefix(seqs)[:limit]
    try:
        return [str(tokenizer.decode([token_id])) for token_id in prefix]
    except Exception:  # a tokenizer that cannot decode single ids: the report then shows positions only
        return []
