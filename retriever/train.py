"""``train``: fit a dual encoder on mined pools with InfoNCE, the MW (AUC) loss or decoupled softmax.

A step takes a batch of ``batch_size`` queries. For each, ``positives_per_query`` of its labelled
positives and ``negatives_per_query`` of its mined negatives are drawn once per epoch with a seeded
generator. All those documents are the columns of one shared (queries x documents) score matrix:
every query is scored against every document of the batch, so each also serves as an in-batch
negative for the other queries. The masks come from :func:`retriever.losses.build_masks`: a column
that is a labelled positive of a query (by document id, another copy of it included) is never that
query's negative.

Scale: ``cache_chunk`` encodes in chunks and replays the gradients from the cached embeddings
(:mod:`retriever.gradcache`), so the batch size is bounded by the score matrix, not by activations.
Under ``torchrun`` every process takes its slice of each global batch, the embeddings of all
processes are gathered with gradients (:mod:`retriever.distributed`) and the loss is the one of the
global batch, so N processes train like one with the N-times batch; only rank 0 writes.

Determinism and resume: the batches of an epoch are a pure function of (pools, seed, epoch); a
checkpoint (:mod:`retriever.checkpoint`) stores the model, optimizer, scheduler, grad scaler,
temperature, RNG states and the data position, so ``resume`` continues exactly as an uninterrupted run
(bit-identical on CPU; on GPU up to the non-determinism of cuBLAS/atomics).

Dynamic negatives: with ``remine_every`` E the pools are replaced after every E epochs by the ``remine`` hook
(:class:`mining.remine.Remining`, which mines with the model as it is then; this module cannot import mining).
A round's pools are written before its first step, so a resume inside the round reads them back and the
batches stay a pure function of (that round's pools, seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from retriever import distributed
from retriever.checkpoint import (
    check_compatible,
    checkpoint_dirs,
    find_checkpoint,
    load_checkpoint_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retriever.data import Corpus, Pool
from retriever.encoder import DualEncoder
from retriever.encoding import default_device, resolve_training_precision
from retriever.gradcache import encode_and_backward
from retriever.io import (
    HardnegError,
    atomic_write,
    file_checksum,
    library_versions,
    new_figure,
    save_figure,
    write_json,
)
from retriever.losses import DistilledLoss, build_masks, make_loss
from retriever.train_settings import LOSSES, TrainConfig

TRAIN_LOG = "train_log.jsonl"
TRAIN_CONFIG = "training_config.json"
LOSS_PLOT = "loss_curve.png"
BEST_DIR = "best"
# Settings that may change when resuming: they change speed, memory or bookkeeping, not the result.
RESUMABLE_CHANGES = ("cache_chunk", "save_steps", "save_total_limit", "eval_steps", "patience")
__all__ = ["LOSSES", "Remine", "TrainConfig", "train"]
# The re-mining hook: (model at the round's start, or None to read a finished round; round number) -> pools.
Remine = Callable[["DualEncoder | None", int], "list[Pool]"]


@dataclass
class QueryExample:
    """One query of a step: the positives trained this epoch, its negatives, all its labelled ids, and the
    pool's (teacher) scores of those positives and negatives (None for a random negative, which has none)."""

    query_id: str
    query: str
    positives: list[str]
    negatives: list[str]
    positive_ids: frozenset[str]
    positive_scores: list[float | None] = field(default_factory=list)
    negative_scores: list[float | None] = field(default_factory=list)


def epoch_batches(pools: list[Pool], config: TrainConfig, epoch: int,
                  corpus_ids: list[str] | None = None) -> list[list[QueryExample]]:
    """The batches of one epoch, a pure function of (pools, seed, epoch) so that resume is exact.

    With ``config.random_negatives`` R, R documents drawn from ``corpus_ids`` (never a positive of the query,
    never one of its mined negatives) are added to each query's negatives, anew every epoch.
    """
    rng = random.Random(config.seed * 1_000_003 + epoch)
    # A stream of its own, so adding random negatives changes no mined draw and no batch (a clean ablation).
    random_rng = random.Random(f"random-negatives:{config.seed}:{epoch}")
    examples = []
    for pool in pools:
        positives = rng.sample(range(len(pool.positives)), min(config.positives_per_query, len(pool.positives)))
        negatives = rng.sample(range(len(pool.negatives)), min(config.negatives_per_query, len(pool.negatives)))
        example = QueryExample(
            pool.query_id, pool.query, [pool.positives[i].doc_id for i in positives],
            [pool.negatives[i].doc_id for i in negatives], frozenset(p.doc_id for p in pool.positives),
            [pool.positives[i].score for i in positives], [pool.negatives[i].score for i in negatives])
        if config.random_negatives:
            example.negatives += _random_documents(random_rng, corpus_ids, config.random_negatives,
                                                   example.positive_ids | {n.doc_id for n in pool.negatives})
            example.negative_scores += [None] * (len(example.negatives) - len(example.negative_scores))
        examples.append(example)
    rng.shuffle(examples)
    return [examples[start:start + config.batch_size] for start in range(0, len(examples), config.batch_size)]


def _random_documents(rng: random.Random, corpus_ids: list[str] | None, count: int, excluded: set[str]) -> list[str]:
    """``count`` distinct documents of the corpus outside ``excluded`` (fewer only if the corpus has no more)."""
    if not corpus_ids:
        raise HardnegError("train: random_negatives needs the corpus ids to draw from")
    chosen: list[str] = []
    for _ in range(count * 20):  # rejection sampling; the excluded set is tiny next to a corpus
        if len(chosen) == count:
            break
        doc_id = corpus_ids[rng.randrange(len(corpus_ids))]
        if doc_id not in excluded and doc_id not in chosen:
            chosen.append(doc_id)
    return chosen


def batch_columns(batch: list[QueryExample]) -> tuple[list[str], list[str], list[list[int]]]:
    """Query texts, column document ids (the positives of all queries, then their hard negatives) and
    each query's target columns."""
    column_ids = [doc_id for example in batch for doc_id in example.positives]
    targets, start = [], 0
    for example in batch:
        targets.append(list(range(start, start + len(example.positives))))
        start += len(example.positives)
    column_ids += [doc_id for example in batch for doc_id in example.negatives]
    return [example.query for example in batch], column_ids, targets


def rank_slices(batch: list[QueryExample], world_size: int) -> list[list[QueryExample]]:
    """Each process's contiguous share of a global batch (:func:`retriever.distributed.shard`)."""
    return [batch[distributed.shard(len(batch), r, world_size)] for r in range(world_size)]


def global_layout(slices: list[list[QueryExample]]) -> tuple[list[frozenset[str]], list[str], list[list[int]]]:
    """Positive ids, column ids and target columns of the global batch, in the order the processes'
    embeddings are gathered (rank 0's queries and columns first)."""
    positive_ids, column_ids, targets = [], [], []
    for part in slices:
        _, columns, part_targets = batch_columns(part)
        targets += [[len(column_ids) + c for c in row] for row in part_targets]
        column_ids += columns
        positive_ids += [example.positive_ids for example in part]
    return positive_ids, column_ids, targets


def teacher_cells(slices: list[list[QueryExample]]) -> tuple[list[int], list[int], list[float]]:
    """(row, column, teacher score) of every cell the pools score: each query's own positives and mined
    negatives, in the global layout of :func:`global_layout`. Random negatives have no teacher score."""
    rows, columns, scores = [], [], []
    row = offset = 0
    for part in slices:
        _, part_columns, _ = batch_columns(part)
        positive_start = offset
        negative_start = offset + sum(len(example.positives) for example in part)
        for example in part:
            for index, score in enumerate(example.positive_scores):
                if score is not None:
                    rows.append(row), columns.append(positive_start + index), scores.append(score)
            for index, score in enumerate(example.negative_scores):
                if score is not None:
                    rows.append(row), columns.append(negative_start + index), scores.append(score)
            positive_start += len(example.positives)
            negative_start += len(example.negatives)
            row += 1
        offset += len(part_columns)
    return rows, columns, scores


def pools_fingerprint(pools: list[Pool]) -> str:
    """A digest of what the data order depends on, so a resume on other pools is refused."""
    digest = hashlib.sha256()
    for pool in pools:
        digest.update(json.dumps([pool.query_id, pool.query, [p.doc_id for p in pool.positives],
                                  [n.doc_id for n in pool.negatives]]).encode())
    return "sha256:" + digest.hexdigest()


def train(pools: list[Pool], corpus: Corpus, config: TrainConfig, output_dir: str | Path, *,
          show_progress: bool = True, provenance: dict | None = None, resume: str | Path | None = None,
          evaluator: Callable[[DualEncoder], float] | None = None,
          on_step: Callable[[int, DualEncoder], None] | None = None,
          remine: Remine | None = None) -> dict:
    """Train and save a model folder to ``output_dir``; returns a summary (steps, losses, seconds, best).

    ``resume``: ``"latest"`` or a checkpoint/run folder to continue from. ``evaluator`` maps the model
    to a dev score (higher is better); with ``config.eval_steps`` it is called every that many steps and
    at the end, and the best model is kept in ``output_dir/best``. ``on_step(step, model)`` is called
    after each finished step (and its checkpoint): a hook for custom logging, or to stop a run in a test.
    ``provenance`` maps input files to checksums, recorded beside the model. ``remine`` (needed by
    ``config.remine_every`` E, see :class:`mining.remine.Remining`) gives the pools of re-mining round r, which
    the epochs from r x E on train on: ``remine(model, r)`` mines them with the model at the end of epoch r x E
    (or reads them when that round is finished), ``remine(None, r)`` only reads a finished round (a resume in the
    middle of it; the other processes of a distributed run, after rank 0 mined).
    """
    config.check()
    output_dir = Path(output_dir)
    missing = sorted({d for pool in pools for d in [p.doc_id for p in pool.positives] + [n.doc_id for n in
                      pool.negatives] if d not in corpus})
    if missing:
        raise HardnegError(f"{len(missing)} document ids of the pools are not in the corpus, e.g. {missing[:3]}")
    if not pools:
        raise HardnegError("train: no pools to train on")
    if config.eval_steps and evaluator is None:
        raise HardnegError("train: eval_steps needs a dev set to evaluate on (--dev-data/--dev-split)")
    if (config.patience or config.dev_fraction) and evaluator is None:
        raise HardnegError("train: patience and dev_fraction need a dev evaluator (the CLI and `run` build it "
                           "from --dev-fraction, --dev-split or --dev-data)")
    if config.remine_every and remine is None:
        raise HardnegError("train: remine_every needs the mining settings to re-mine with (the CLI and `run` "
                           "pass them; in Python give remine=mining.remine.Remining(...))")
    if config.distills:
        unscored = sum(1 for pool in pools for c in [*pool.positives, *pool.negatives] if c.score is None)
        if unscored:
            raise HardnegError(f"train: distillation needs a teacher score for every positive and negative; "
                               f"{unscored} have none (mine with --teacher or --cross-encoder)")

    identity = {f"config.{key}": value for key, value in asdict(config).items()}
    identity["pools"] = pools_fingerprint(pools)
    checkpoint, state = None, None
    if resume is not None:
        checkpoint = find_checkpoint(output_dir, resume)
        state, saved = load_checkpoint_state(checkpoint)
        check_compatible(checkpoint, saved["identity"], identity, tuple(f"config.{k}" for k in RESUMABLE_CHANGES))
    elif checkpoint_dirs(output_dir):
        raise HardnegError(f"{output_dir} already holds checkpoints of a run; continue it with --resume latest, "
                           "or train into another output folder")

    distributed.init_from_env()
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    device = _device(world)
    if config.precision == "fp16" and device.type != "cuda":
        raise HardnegError("train: fp16 needs a CUDA GPU (it relies on a loss scaler for CUDA); use bf16 on CPU")
    precision = resolve_training_precision(config.precision, device)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + rank)

    source = checkpoint / "model" if checkpoint else config.model
    model = DualEncoder.load(source, pooling=config.pooling, normalize=config.normalize,
                             query_prefix=config.query_prefix, document_prefix=config.document_prefix,
                             max_length=config.max_length, device=device)
    model.name = config.model
    model.train()
    loss_module = _loss_module(config).to(device)

    steps_per_epoch = math.ceil(len(pools) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    corpus_ids = list(corpus.ids) if config.random_negatives else None
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    if list(loss_module.parameters()):
        groups.append({"params": list(loss_module.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    log: list[dict] = []
    step, best = 0, {"step": None, "score": None, "stale": 0}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loss_module.load_state_dict(state["loss"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, log, best = state["step"], list(state["log"]), dict(state["best"])
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        elif main:
            warnings.warn(f"resuming on {world} processes, the checkpoint has {len(rngs)}: the data order is the "
                          "same, the dropout RNG is not", stacklevel=2)

    trained = distributed.wrap_ddp(model)  # the model itself for one process
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    meta = {"identity": identity, "model_identity": _model_identity(model), "world_size": world}

    def checkpoint_now() -> None:
        rngs = _all_rng_states(world)
        if main:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "loss": loss_module.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                             "rng": rngs, "step": step, "epoch": step // steps_per_epoch, "log": log, "best": best}
            save_checkpoint(output_dir, step, model, trainer_state,
                            meta | {"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                                    "best": best, "config": asdict(config)}, config.save_total_limit)
            _write_log(output_dir, log)
        distributed.barrier()

    def evaluate_now() -> None:
        if main:
            saved_rng = rng_state()  # evaluation must not shift the dropout RNG of the training
            score = float(evaluator(model))
            set_rng_state(saved_rng)
            model.train()
            log[-1]["dev"] = round(score, 6)
            if best["score"] is None or score > best["score"]:
                best.update(step=step, score=score, stale=0)
                model.save(output_dir / BEST_DIR)
            else:
                best["stale"] = best.get("stale", 0) + 1
        distributed.barrier()
        best["stale"] = distributed.broadcast_int(best.get("stale", 0))

    def evaluation_due(epoch_done: bool) -> bool:
        if evaluator is None:
            return False
        if config.eval_steps:
            return step % config.eval_steps == 0 or step == total_steps
        return epoch_done or step == total_steps

    def stopped_early() -> bool:
        """Patience ran out: that many dev evaluations in a row without a new best."""
        return bool(config.patience) and best.get("stale", 0) >= config.patience

    started = time.time()
    examples_seen = 0
    current_round, rounds = 0, []
    try:
        with tqdm(total=total_steps, initial=step, desc=f"train {config.loss}", unit="step",
                  disable=not (show_progress and main)) as bar:
            for epoch in range(step // steps_per_epoch, config.epochs):
                if step >= total_steps or stopped_early():
                    break
                if config.remine_every and epoch // config.remine_every != current_round:
                    current_round = epoch // config.remine_every
                    at_boundary = step == epoch * steps_per_epoch and epoch % config.remine_every == 0
                    pools = _remined_pools(remine, model if at_boundary else None, current_round, pools, main)
                    rounds.append({"round": current_round, "epoch": epoch, "step": step})
                batches = epoch_batches(pools, config, epoch, corpus_ids)
                for index in range(step - epoch * steps_per_epoch, len(batches)):
                    if step >= total_steps:
                        break
                    batch = batches[index]
                    tick = time.time()
                    slices = rank_slices(batch, world)
                    if any(not part for part in slices):  # fewer queries than processes: nothing to split
                        step += 1
                        scheduler.step()
                        continue
                    loss = _train_step(trained, loss_module, slices, rank, corpus, config, autocast, scaler,
                                       device)
                    if not math.isfinite(loss):
                        if main:
                            _write_log(output_dir, log)
                        last = checkpoint_dirs(output_dir)
                        raise HardnegError(
                            f"train: loss is {loss} at step {step + 1} (epoch {epoch}, batch {index} of the epoch, "
                            f"queries {', '.join(e.query_id for e in batch[:5])}{', ...' if len(batch) > 5 else ''}); "
                            "stopped without updating the model"
                            + (f"; the last good checkpoint is {last[-1]}" if last else "")
                            + ". Lower the learning rate, raise the temperature, or use fp32/bf16")
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    examples_seen += len(batch)
                    record = {"step": step, "epoch": epoch, "loss": round(loss, 6),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                              "examples_per_s": round(len(batch) / (time.time() - tick), 2)}
                    if config.learnable_temperature:
                        record["temperature"] = round(float(loss_module.temperature.detach()), 6)
                    log.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    ex_s=record["examples_per_s"])
                    bar.update(1)
                    if evaluation_due(index == len(batches) - 1):
                        evaluate_now()
                    if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                        checkpoint_now()
                    if on_step is not None:
                        on_step(step, model)
                    if stopped_early():
                        break
    except HardnegError:
        raise
    except BaseException:
        if main and log:
            _write_log(output_dir, log)
        raise

    if config.save_steps:
        checkpoint_now()
    summary = {"steps": step, "epochs": config.epochs, "epochs_run": round(step / steps_per_epoch, 3),
               "stopped_early": stopped_early(), "queries_per_epoch": len(pools),
               "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
               "seconds": round(time.time() - started, 1), "examples_seen_this_session": examples_seen,
               "resumed_from": str(checkpoint) if checkpoint else None, "world_size": world, "precision": precision,
               "best_step": best["step"], "best_dev": best["score"]}
    if config.remine_every:
        summary["remine_rounds"] = rounds
    if any("temperature" in r for r in log):
        summary["final_temperature"] = log[-1].get("temperature")
    if main:
        _save_model_into(model, output_dir)
        _write_log(output_dir, log)
        _plot_losses(output_dir / LOSS_PLOT, log)
        corpus_checksum = {str(corpus.path): file_checksum(corpus.path)} if corpus.path else {}
        write_json(output_dir / TRAIN_CONFIG, {"config": asdict(config), "summary": summary,
                                               "model_identity": meta["model_identity"],
                                               "library_versions": library_versions(),
                                               "input_checksums": corpus_checksum | (provenance or {})})
    distributed.barrier()
    return summary


def _train_step(trained, loss_module, slices, rank, corpus, config, autocast, scaler, device) -> float:
    """Encode this process's slice, score it against the gathered global batch, back-propagate."""
    positive_ids, column_ids, target_columns = global_layout(slices)
    targets, negatives = build_masks(positive_ids, column_ids, target_columns)
    targets, negatives = targets.to(device), negatives.to(device)
    extra = ()
    if config.distills:
        rows, columns, values = teacher_cells(slices)
        teacher = torch.zeros(targets.shape, dtype=torch.float32)
        scored = torch.zeros(targets.shape, dtype=torch.bool)
        teacher[rows, columns] = torch.tensor(values, dtype=torch.float32)
        scored[rows, columns] = True
        extra = (teacher.to(device), scored.to(device))
    queries, local_columns, _ = batch_columns(slices[rank])

    def loss_fn(query_vectors: torch.Tensor, document_vectors: torch.Tensor) -> torch.Tensor:
        # Loss scale 1: the gather's backward sums over ranks and DDP averages (retriever.distributed).
        all_queries, all_documents = distributed.gather_embeddings(query_vectors, document_vectors)
        return loss_module(all_queries @ all_documents.T, targets, negatives, *extra)

    loss = encode_and_backward(trained, queries, [corpus.text_of(d) for d in local_columns], loss_fn,
                               chunk_size=config.cache_chunk, autocast=autocast, scaler=scaler)
    return float(loss)


def _remined_pools(remine: Remine, model: DualEncoder | None, round_number: int, pools: list[Pool],
                   main: bool) -> list[Pool]:
    """The pools of re-mining round ``round_number``: rank 0 mines (or reads) them, the others read them after."""
    if main:
        fresh = remine(model, round_number)
    distributed.barrier()
    if not main:
        fresh = remine(None, round_number)
    if sorted(p.query_id for p in fresh) != sorted(p.query_id for p in pools):
        raise HardnegError(f"train: re-mining round {round_number} gave pools for other queries than training "
                           f"uses ({len(fresh)} against {len(pools)}); the steps per epoch would change")
    return fresh


def _device(world: int) -> torch.device:
    return distributed.device() if world > 1 else default_device()


def _loss_module(config: TrainConfig) -> torch.nn.Module:
    """The loss of ``config``: ``mw`` with ``mw_weight`` is InfoNCE + mw_weight x MW; ``distill_weight`` adds
    the distillation term (:class:`~retriever.losses.DistilledLoss`); ``kd`` is that term alone."""
    params = {"temperature": config.temperature, "learn_temperature": config.learnable_temperature}
    distill = {"form": config.distill_form, "teacher_temperature": config.teacher_temperature}
    if config.loss == "kd":
        return DistilledLoss(None, **distill, **params)
    if config.loss == "mw" and config.mw_weight is not None:
        loss = make_loss("combined", mw_weight=config.mw_weight, pairs=config.mw_pairs, symmetric=config.symmetric,
                         **params)
    elif config.loss == "mw":
        loss = make_loss("mw", pairs=config.mw_pairs, **params)
    elif config.loss == "infonce":
        loss = make_loss("infonce", symmetric=config.symmetric, **params)
    else:
        loss = make_loss(config.loss, **params)
    if config.distill_weight:
        return DistilledLoss(loss, weight=config.distill_weight, temperature=config.temperature, **distill)
    return loss


def _model_identity(model: DualEncoder) -> dict:
    config = model.model.config
    return {"name": model.name, "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None), "vocab_size": getattr(config, "vocab_size", None),
            "pooling": model.pooling, "normalize": model.normalize, "max_length": model.max_length}


def _all_rng_states(world: int) -> list[dict]:
    """Every process's RNG states (rank order), so each resumes its own dropout stream."""
    if world == 1:
        return [rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def _save_model_into(model: DualEncoder, output_dir: Path) -> None:
    """Put the final model files at the top of ``output_dir`` without touching checkpoints/ and best/.

    Each entry is renamed into place from a finished staging copy, so a crash leaves a loadable model.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".final.", dir=output_dir))
    try:
        model.save(staging / "model")
        for entry in sorted((staging / "model").iterdir()):
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_log(output_dir: Path, log: list[dict]) -> None:
    with atomic_write(output_dir / TRAIN_LOG) as handle:
        handle.writelines(json.dumps(record) + "\n" for record in log)


def _plot_losses(path: Path, log: list[dict]) -> None:
    """The training loss per step (and its running mean, and dev scores when evaluated) as a PNG."""
    if not log:
        return
    try:
        figure = new_figure(7, 4)
    except ImportError:  # plotting is a convenience; training results do not depend on it
        warnings.warn("matplotlib is not installed: no loss plot written", stacklevel=2)
        return
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axis = figure.subplots()
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, label="loss")
    axis.plot(steps[window - 1:], smooth, color="tab:blue", label=f"running mean ({window} steps)")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    dev = [(r["step"], r["dev"]) for r in log if "dev" in r]
    if dev:
        other = axis.twinx()
        other.plot(*zip(*dev), "o-", color="tab:orange", label="dev")
        other.set_ylabel("dev score")
        other.legend(loc="upper right")
    axis.legend(loc="upper left" if dev else "best")
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


