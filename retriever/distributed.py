"""Data-parallel training with cross-device negatives: torchrun/DDP, a differentiable all-gather, loss scaling.

With N processes (``torchrun --nproc-per-node N``) each encodes its share of a global batch; the
embeddings are all-gathered so every query is scored against every document of the *global* batch, and
N processes with batch B train exactly like one process with batch N*B.

The rule (what makes the gradients equal), tested against one process on the concatenated batch:

1. Every rank builds the same global batch (the epoch order is a seeded, pure function of the data) and
   encodes only its contiguous share, ``global_batch[shard(len(global_batch))]``.
2. Every rank gathers queries and documents with :func:`all_gather_with_grad` (rank order, so the global
   column ``j`` of rank ``r``'s local column ``k`` is ``sum(sizes of ranks < r) + k``: labels and masks
   must be built on the global column list, i.e. each rank's local labels offset by the columns of the
   ranks before it — :func:`global_columns` does this) and computes the loss of the *whole* global
   score matrix with the global masks. All ranks therefore hold the same loss value L.
3. The backward of :func:`all_gather_with_grad` all-reduces (sums) the gradient of the gathered tensor
   and keeps this rank's rows, so rank r receives ``N * dL/de_r`` for its own embeddings ``e_r``. DDP
   then *averages* parameter gradients over the N ranks: ``(1/N) * sum_r N * dL/de_r * de_r/dtheta =
   dL/dtheta``, the single-process gradient. **Loss scale: 1** — do not multiply or divide the loss.
   Learnable loss parameters (a temperature) are outside DDP; since every rank computes the same L
   from the same gathered tensors, their gradients are already identical on all ranks.

   (Variant, if a rank computes only its own query rows against all gathered documents: its loss must
   be ``N * (sum over its target cells) / (target cells of the global batch)``, i.e. the local mean times
   ``N * local_cells / global_cells``, and learnable loss parameters need their gradient all-reduced.
   :func:`local_rows_scale` gives that factor. This only holds for row-separable losses: not for the
   symmetric InfoNCE term or the batch-global MW pairs; the rule above holds for all of them.)

Gradient caching under DDP (:mod:`retriever.gradcache`): the loss closure gathers the cached leaf
embeddings; the replayed chunks run under ``no_sync()`` except the last, so gradients are all-reduced
once per step. Ranks must run the same number of collective calls: shard batches evenly.

API: :func:`init_from_env` (torchrun environment -> process group: gloo on CPU, nccl on CUDA; a no-op
for a single process), :func:`world_size`, :func:`rank`, :func:`is_main` (write files only there),
:func:`shard`, :func:`global_columns`, :func:`all_gather_with_grad`, :func:`gather_embeddings`,
:func:`all_reduce_mean`, :func:`all_gather_objects` and :func:`broadcast_object` (what sharded mining and
evaluation exchange, :mod:`retriever.dense`), :func:`barrier`, :func:`device`, :func:`cleanup`, and
:func:`wrap_ddp`, which freezes the parameters the embedding never uses (BERT's pooler: DDP would otherwise
stop, waiting for their gradients) and wraps the encoder in DDP without per-forward buffer syncs (identity
for one process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from retriever.io import HardnegError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE): they share its memory."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1) if is_distributed() else 1
    except ValueError:
        return 1


def is_main() -> bool:
    """True on the process that writes checkpoints, logs and the final model (rank 0)."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's variables; returns whether training is distributed.

    Without ``WORLD_SIZE`` > 1 (a plain ``python`` run) nothing happens. The backend defaults to nccl when
    CUDA is available (each process then uses GPU ``LOCAL_RANK``) and gloo otherwise.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or is_distributed():
        return is_distributed()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise HardnegError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with torchrun")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(device())
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return True


def device() -> torch.device:
    """This process's device: its ``LOCAL_RANK`` GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise HardnegError(f"process LOCAL_RANK={local_rank} has no GPU: this machine has {count}; launch "
                               f"at most {count} processes per node (torchrun --nproc-per-node {count}), or hide "
                               "the GPUs (CUDA_VISIBLE_DEVICES=) to run every process on the CPU with gloo")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(total: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of ``total`` items; the first ``total % world`` ranks get one more."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(total, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (1 if rank_ < extra else 0))


def global_columns(per_rank_columns: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """The gathered column ids (rank order) and each rank's column offset (add it to local labels)."""
    columns: list[str] = []
    offsets: list[int] = []
    for local in per_rank_columns:
        offsets.append(len(columns))
        columns.extend(local)
    return columns, offsets


def local_rows_scale(local_cells: int, global_cells: int) -> float:
    """Factor for the local mean loss when a rank scores only its own queries (see the module docstring)."""
    return world_size() * local_cells / max(global_cells, 1)


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows (sizes may differ); backward sums the gradients over ranks."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([part[:n] for part, n in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows: sum their gradients
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order, differentiable; identity for one process."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)


def gather_embeddings(queries: Tensor, documents: Tensor) -> tuple[Tensor, Tensor]:
    """Global query and document embeddings for the loss (rank order), differentiable."""
    return all_gather_with_grad(queries), all_gather_with_grad(documents)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder wrapped in ``DistributedDataParallel`` (the model itself when not distributed).

    A probe forward/backward (in eval mode, so no random numbers are drawn) finds the parameters that do
    not reach the embedding, e.g. the BERT pooler, and freezes them: they never get a gradient, and DDP
    would otherwise wait for one forever. Buffers are synced once at construction, not at every forward
    (the gradient cache runs chunked forwards, whose number may differ between ranks on a ragged batch).
    """
    if not is_distributed():
        return model
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    model(model.tokenize(["probe"], is_query=True)).sum().backward()
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    on_cuda = next(model.parameters()).device.type == "cuda"
    ids = [next(model.parameters()).device.index] if on_cuda else None
    # The encoder's buffers (position ids) are constants: no need to broadcast them every forward.
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_mean(value: float | Tensor) -> float:
    """The mean of a number over ranks (for logging); the value itself for one process."""
    if not is_distributed():
        return float(value)
    tensor = torch.tensor(float(value), dtype=torch.float64,
                          device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def broadcast_int(value: int, source: int = 0) -> int:
    """Rank ``source``'s integer on every rank (a decision only rank 0 can make, e.g. early stopping)."""
    if not is_distributed():
        return int(value)
    tensor = torch.tensor(int(value), dtype=torch.int64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, src=source)
    return int(tensor.item())


def all_gather_objects(value: object) -> list:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` for one process.

    What sharded encoding and search exchange: query embeddings, per-shard top-k lists, scores of the
    documents a rank holds. These are small next to the corpus, so pickling them costs little."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: object, source: int = 0) -> object:
    """Rank ``source``'s ``value`` on every rank (what only rank 0 can know, e.g. which shards it has written)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]
