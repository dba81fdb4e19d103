"""Will a training step fit in memory? An estimate, checked with a margin before the first step.

Why: a contrastive step keeps the activations of every text of the batch until the backward pass, so its memory
grows with batch size x texts per query x tokens. Past what the machine has, a GPU raises out-of-memory after
the mining and model loading are done, and a CPU is worse: the kernel's OOM killer ends the process with no
message at all (32 queries with 7 documents each, 256 tokens, dropout on: ~25 GB for the 6-layer MiniLM). Gradient
caching (``train.cache_chunk``) gives the same gradients in the memory of one chunk, so the useful answer is
"set cache_chunk to N", said before any work.

The estimate counts the values autograd keeps per token and per layer of a BERT-like encoder: about
6 x hidden + 3 x intermediate with fused attention, 10 x hidden more with dropout masks, and the attention
matrices (about 2.4 x heads x length) where attention is not fused (dropout on a CPU takes PyTorch off its fused
kernel). The constants were measured with ``bench/bench_training.py --memory-only`` (a step's peak memory beside
this estimate, BENCHMARKS.md "Training memory"), and ``tests/test_memory.py`` holds them to a model of other
proportions. The texts are the first step's own, tokenized as the step will pad them. A run is refused only when
80 % of the estimate exceeds the free memory, so a wrong refusal needs the estimate to be 25 % too high; a step
that passes the check can still run out on a later, longer batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retriever.io import HardnegError

GB = 1024 ** 3
REFUSE_AT = 0.8  # of the estimate: refuse only when even 80 % of it is more than the free memory
SUGGEST_WITHIN = 0.7  # of the free memory: the suggested cache chunk leaves room for the rest


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device``; None where the platform does not say."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_room()
    if free is None or limit is None:
        return free if limit is None else limit
    return min(free, limit)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """A container's memory limit minus its use (cgroup v2), None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def values_per_token_layer(model_config: object, length: int, *, dropout: bool, fused_attention: bool) -> float:
    """Values autograd keeps for one token in one layer of a BERT-like encoder (see the module docstring)."""
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    values = 6 * hidden + 3 * intermediate
    if dropout:
        values += 10 * hidden
    if not fused_attention:
        values += 2.4 * model_config.num_attention_heads * length
    return values


def pass_bytes(model_config: object, texts: int, length: int, *, dropout: bool, fused_attention: bool,
               bytes_per_value: int) -> float:
    """Activation bytes of one forward pass with gradients over ``texts`` texts padded to ``length`` tokens."""
    return (texts * length * model_config.num_hidden_layers * bytes_per_value
            * values_per_token_layer(model_config, length, dropout=dropout, fused_attention=fused_attention))


@dataclass
class StepEstimate:
    """What one training step on this process holds at its peak (bytes), and what the estimate rests on."""

    activations: float  # the largest set of activations alive at once (both passes, or the largest chunk)
    fixed: float  # gradients and AdamW's two moments (fp32), allocated at the first step
    per_text: float  # activations of one text at ``length`` tokens: what one more text in a chunk costs
    length: int  # padded tokens of the largest pass
    texts: int
    dropout: bool
    fused_attention: bool

    @property
    def total(self) -> float:
        return self.activations + self.fixed


def estimate_step(model, queries: list[str], documents: list[str], *, chunk_size: int | None, precision: str,
                  device: torch.device) -> StepEstimate | None:
    """The memory of one step of ``model`` (a DualEncoder in training mode) on these texts, tokenized and padded
    as the step will pad them (queries and documents apart, per chunk with gradient caching); None for a model
    that is not BERT-like (no basis for an estimate)."""
    model_config = getattr(model.model, "config", None)
    if not all(hasattr(model_config, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")):
        return None
    dropout = model.training and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    fused = device.type == "cuda" or not dropout
    width = 4 if precision == "fp32" else 2

    def cost(texts: list[str], is_query: bool) -> tuple[float, int]:
        length = int(model.tokenize(texts, is_query=is_query)["input_ids"].shape[1]) if texts else 0
        return pass_bytes(model_config, len(texts), length, dropout=dropout, fused_attention=fused,
                          bytes_per_value=width), length

    if chunk_size is None:
        (query_cost, _), (document_cost, length) = cost(queries, True), cost(documents, False)
        activations = query_cost + document_cost
    else:
        chunks = [(queries[i:i + chunk_size], True) for i in range(0, len(queries), chunk_size)]
        chunks += [(documents[i:i + chunk_size], False) for i in range(0, len(documents), chunk_size)]
        activations, length = max(cost(texts, is_query) for texts, is_query in chunks)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return StepEstimate(activations=activations, fixed=3 * 4 * parameters,
                        per_text=pass_bytes(model_config, 1, length, dropout=dropout, fused_attention=fused,
                                            bytes_per_value=width),
                        length=length, texts=len(queries) + len(documents), dropout=dropout, fused_attention=fused)


def check_step_memory(model, queries: list[str], documents: list[str], *, chunk_size: int | None,
                      precision: str, device: torch.device, batch_size: int, processes_here: int = 1) -> None:
    """Refuse a training step that cannot fit, naming the estimate and the ``cache_chunk`` that would.

    ``queries`` and ``documents`` are one step's texts on this process; ``processes_here`` processes share this
    machine's memory on a CPU.
    """
    free = free_memory(device)
    if free is None:
        return
    if device.type == "cpu":
        free //= processes_here
    estimate = estimate_step(model, queries, documents, chunk_size=chunk_size, precision=precision, device=device)
    if estimate is None or REFUSE_AT * estimate.total <= free:
        return
    fits = int((SUGGEST_WITHIN * free - estimate.fixed) // estimate.per_text)
    shared = device.type == "cpu" and processes_here > 1
    where = f"{_size(free)} free" + (f" per process ({processes_here} on this machine)" if shared else "")
    step = (f"{estimate.texts} texts of up to {estimate.length} tokens at once" if chunk_size is None
            else f"chunks of {chunk_size} texts of up to {estimate.length} tokens")
    advice = (f"set train.cache_chunk (--cache-chunk) to {min(fits, batch_size)} or less (gradient caching: the "
              "same gradients, the memory of one chunk)" if fits >= 1 and (chunk_size is None or fits < chunk_size)
              else "lower train.max_length, or train a smaller model")
    if device.type == "cpu" and not estimate.fused_attention:
        advice += "; train.dropout 0 also lets the CPU use fused attention, which keeps no attention matrices"
    raise HardnegError(f"train: one step needs about {_size(estimate.total)} ({step} with gradients, plus "
                       f"gradients and optimizer state) and there is {where}: it would run out of memory (on a "
                       f"CPU the system kills it without a message); {advice}")


def _size(count: float) -> str:
    return f"{count / GB:.1f} GB" if count >= GB / 10 else f"{count / 2**20:.0f} MB"
