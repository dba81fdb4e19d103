"""How texts become embeddings at the machine's limit: the numeric precision and the batching.

Encoding the corpus is what mining and evaluation wait on, and it is bound by the encoder's matrix
multiplies. Two levers are taken here, both measured in ``bench/bench_encoding.py`` (BENCHMARKS.md):

- **Precision.** A CPU with AVX-512 BF16 or AMX, and most CUDA GPUs, multiply bfloat16 matrices
  several times faster than float32. ``auto`` uses bf16 autocast where the hardware runs it natively
  and float32 elsewhere; autocast keeps LayerNorm, softmax and the pooling sums in float32, so
  all-MiniLM-L6-v2's embeddings stay within cosine 0.9999 of float32 ones (a full ``.to(bfloat16)``
  cast of the weights is no faster here and drops to 0.996 on some documents). Embeddings leave the
  encoder as float32 whatever the precision, so filters and metrics always compute in float32.
- **Batches by token budget.** Texts are tokenized once, sorted by token count, and cut into batches
  of at most ``budget`` tokens *after padding*, so a batch of 12-token queries holds twenty times as
  many texts as a batch of 256-token documents and nothing is padded to a length it does not need.

The settings users give (:class:`EncodeSettings`) are declared here once; the CLI flags, the ``encode:``
section of the configs and the Python defaults come from that declaration (:mod:`retriever.settings`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retriever.io import HardnegError
from retriever.settings import setting

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI parser starts without it
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_CACHE_DIR = Path(os.environ.get("HARDNEG_CACHE_DIR", "~/.cache/hardneg/embeddings")).expanduser()



@dataclass
class EncodeSettings:
    """How every corpus and query encode runs (``mine``, ``evaluate``, the dev scoring of ``train``, ``run``,
    ``reproduce``): the CLI's ``--encode-*`` flags and a config's ``encode:`` section."""

    batch_size: int = setting(64, "full-length texts per encoding batch; batches hold this many texts' worth of "
                                  "tokens, so short texts go in larger ones", ge=1)
    max_length: int | None = setting(None, "truncate texts to this many tokens (default: the model's)", ge=1)
    precision: str = setting("auto", "precision of every encode: auto (bf16 where the CPU or GPU runs it natively, "
                                     "else fp32), fp32, bf16, fp16 (CUDA only); embeddings are float32 either way",
                             choices=PRECISIONS)
    cache_dir: str | None = setting(None, "where corpus embeddings are cached, keyed by the model's files, the "
                                          "corpus checksum and the encoding options: a later mine or evaluate with "
                                          "the same key reads them back, whatever its number of processes "
                                          "(default: $HARDNEG_CACHE_DIR or ~/.cache/hardneg/embeddings)",
                                    aliases=("--cache-dir",))
    cache: bool = setting(True, "read and write that cache (--no-cache: encode afresh and keep nothing)",
                          aliases=("--cache",))


ENCODE_DEFAULTS: dict = asdict(EncodeSettings())
"""The defaults of :class:`EncodeSettings` as a mapping (the form :func:`encode_options` takes)."""


def encode_options(settings: dict, *, show_progress: bool = True) -> dict:
    """The keyword options a model loader and a dense retriever take, from ``encode:`` settings (or CLI flags).

    ``max_length`` unset means the model's own limit, so it is passed only when given; ``cache_dir`` is the
    embeddings cache folder, or None with ``cache: false``.
    """
    unknown = sorted(set(settings) - set(ENCODE_DEFAULTS))
    if unknown:
        raise HardnegError(f"unknown encode setting(s) {unknown}; known: {', '.join(ENCODE_DEFAULTS)}")
    merged = ENCODE_DEFAULTS | {key: value for key, value in settings.items() if value is not None}
    for key in ("batch_size", "max_length"):
        value = merged[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HardnegError(f"encode {key} must be a whole number >= 1, got {value!r}")
    if not isinstance(merged["cache"], bool):
        raise HardnegError(f"encode cache must be true or false, got {merged['cache']!r}")
    if merged["precision"] not in PRECISIONS:
        raise HardnegError(f"unknown encoding precision {merged['precision']!r}; choose one of {', '.join(PRECISIONS)}")
    options = {"batch_size": merged["batch_size"], "precision": merged["precision"], "show_progress": show_progress,
               "cache_dir": Path(merged["cache_dir"] or DEFAULT_CACHE_DIR).expanduser() if merged["cache"] else None}
    if merged["max_length"]:
        options["max_length"] = merged["max_length"]
    return options


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), where bf16 pays off."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:  # older torch: read the flags the kernel reports
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision that will run on ``device``: ``auto`` decided, anything the device cannot do refused."""
    import torch

    device = torch.device(device)
    if precision not in PRECISIONS:
        raise HardnegError(f"unknown encoding precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise HardnegError("encoding precision fp16 needs a CUDA GPU (CPUs have no fast fp16 matmul); "
                           "use bf16 or auto on a CPU")
    return precision


def resolve_training_precision(precision: str, device: torch.device | str) -> str:
    """The autocast precision of a training run: as for encoding, except that ``auto`` never picks fp16
    (fp16 training needs a loss scaler and can overflow; bf16 or fp32 are the safe automatic choices)."""
    resolved = resolve_precision(precision, device)
    return "fp32" if precision == "auto" and resolved == "fp16" else resolved


def default_device() -> torch.device:
    """The device hardneg computes on when none is given: the (first) CUDA GPU when torch sees one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str) -> None:
    """Refuse a precision this machine cannot run, before any model loads (the CLI's early check)."""
    resolve_precision(precision, default_device())


def describe_precision(precision: str, device: torch.device | str) -> str:
    """One line saying which precision encodes and why, for the user to see before a long encode."""
    import torch

    resolved = resolve_precision(precision, device)
    device = torch.device(device)
    if precision != "auto":
        return f"encoding in {resolved} on {device.type} (as asked)"
    if device.type == "cpu":
        why = "the CPU has native bf16 (AVX-512 BF16/AMX)" if resolved == "bf16" else "the CPU has no native bf16"
    else:
        why = "the GPU supports bf16" if resolved == "bf16" else "the GPU has no bf16"
    return (f"encoding in {resolved} on {device.type} (auto: {why}; float32 with --encode-precision fp32 or "
            "encode.precision: fp32)")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast to the resolved ``precision`` for a whole encode (one context, so weight casts are reused)."""
    import torch

    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16):
        yield


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[np.ndarray]:
    """Positions into ``lengths`` grouped longest first, each group's ``size x longest <= budget``.

    A text longer than the budget still gets a batch of its own. The groups cover every position
    exactly once; callers put the outputs back in input order.
    """
    if budget < 1:
        raise HardnegError(f"encoding: the token budget must be >= 1, got {budget}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, budget // longest)
        batches.append(order[start:start + size])
        start += size
    return batches


def pad_batch(columns: dict[str, list[list[int]]], rows: Sequence[int], *, pad_token_id: int,
              pad_token_type_id: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Rows of already-tokenized texts (``columns`` as a fast tokenizer returns them, attention mask
    included) padded to the longest of them, as the tokenizer's own padding would."""
    import torch

    longest = max(len(columns["input_ids"][row]) for row in rows)
    pads = {"input_ids": pad_token_id, "token_type_ids": pad_token_type_id}
    batch = {}
    for key, values in columns.items():
        padded = np.full((len(rows), longest), pads.get(key, 0), dtype=np.int64)
        for i, row in enumerate(rows):
            tokens = values[row]
            if padding_side == "left":
                padded[i, longest - len(tokens):] = tokens
            else:
                padded[i, :len(tokens)] = tokens
        batch[key] = torch.from_numpy(padded)
    return batch
