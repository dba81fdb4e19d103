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
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from retriever import distributed, soup
from retriever.checkpoint import (
    SAFETY_NET,
    StopSignal,
    check_compatible,
    checkpoint_dirs,
    find_checkpoint,
    load_checkpoint_state,
    load_checkpoint_summary,
    remove_safety_nets,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retriever.data import Corpus, Dataset, Pool
from retriever.embedding_table import check_tables
from retriever.encoder import DualEncoder, is_sentence_transformer
from retriever.encoding import default_device, resolve_training_precision
from retriever.gradcache import encode_and_backward
from retriever.io import (
    HardnegError,
    atomic_write,
    check_output_folder,
    file_checksum,
    library_versions,
    new_figure,
    remove_stale_staging,
    save_figure,
    write_json,
)
from retriever.losses import DistilledLoss, build_masks, make_loss
from retriever.memory import check_step_memory
from retriever.mixture import group_document_ids
from retriever.model_card import write_model_card
from retriever.protocol import Scorer, components, describe
from retriever.ranks import alone
from retriever.reporting import Reporter, check_report_target, open_reporter
from retriever.train_settings import LOSSES, SAFETY_NET_SECONDS, TrainConfig

# The run folder (``output_dir``). The model folder holds the model and its card only, so that uploading or
# sharing it as it is carries no logs, checkpoints or optimizer states; they live beside it.
MODEL_DIR = "model"                       # the trained model (the best on dev when dev selection ran) + README.md
TRAIN_LOG = "logs/train_log.jsonl"        # one JSON record per step: loss, lr, grad norm, examples/s, dev
LOSS_PLOT = "logs/loss_curve.png"
TENSORBOARD_DIR = "logs/tensorboard"      # with report_to tensorboard
TRAIN_CONFIG = "training_config.json"     # config, summary, mining record, checksums, library versions
# Settings that may change when resuming: they change speed, memory or bookkeeping, not the result.
RESUMABLE_CHANGES = ("cache_chunk", "save_steps", "save_total_limit", "eval_steps", "patience")
__all__ = ["LOSSES", "Remine", "TrainConfig", "TrainResult", "Trainer", "train"]
# The re-mining hook: (model at the round's start, or None to read a finished round; round number) -> pools.
# A hook that keeps finished rounds on disk (mining.remine.Remining) may offer start_afresh(), which a run that
# does not resume calls first, so that it never trains on rounds another run left behind.
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
                  corpus_ids: list[str] | dict[str, list[str]] | None = None,
                  groups: list[str] | None = None) -> list[list[QueryExample]]:
    """The batches of one epoch, a pure function of (pools, seed, epoch) so that resume is exact.

    With ``config.random_negatives`` R, R documents drawn from ``corpus_ids`` (never a positive of the query,
    never one of its mined negatives) are added to each query's negatives, anew every epoch. ``groups`` (each
    pool's dataset, :func:`retriever.mixture.mix`) with more than one dataset: every batch holds the queries of one
    dataset (in-batch negatives from the same collection), the batches of all datasets in a seeded order, and
    ``corpus_ids`` maps each dataset to the documents its random negatives come from.
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
            drawn_from = corpus_ids[groups[len(examples)]] if isinstance(corpus_ids, dict) else corpus_ids
            example.negatives += _random_documents(random_rng, drawn_from, config.random_negatives,
                                                   example.positive_ids | {n.doc_id for n in pool.negatives})
            example.negative_scores += [None] * (len(example.negatives) - len(example.negative_scores))
        examples.append(example)
    if groups is None or len(set(groups)) < 2:
        rng.shuffle(examples)
        return _chunks(examples, config.batch_size)
    batches = []
    for name in dict.fromkeys(groups):  # datasets in first-seen order, so the draw does not depend on set order
        members = [example for example, group in zip(examples, groups) if group == name]
        rng.shuffle(members)
        batches += _chunks(members, config.batch_size)
    rng.shuffle(batches)
    return batches


def batches_per_epoch(pools: int, batch_size: int, groups: list[str] | None = None) -> int:
    """How many batches :func:`epoch_batches` makes (each dataset of ``groups`` ends with its own last batch)."""
    if groups is None or len(set(groups)) < 2:
        return math.ceil(pools / batch_size)
    return sum(math.ceil(groups.count(name) / batch_size) for name in set(groups))


def _chunks(examples: list[QueryExample], size: int) -> list[list[QueryExample]]:
    return [examples[start:start + size] for start in range(0, len(examples), size)]


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


def batch_teacher_scores(teacher: Scorer, corpus: Corpus, slices: list[list[QueryExample]]) -> torch.Tensor:
    """The teacher's score of every cell of the global batch, each query against every column, in the layout of
    :func:`global_layout` (``distill_scope="batch"``). Every process asks for the same scores, so a teacher that
    splits its work over the ranks (dense search, BM25) takes part as one collective."""
    _, column_ids, _ = global_layout(slices)
    examples = [example for part in slices for example in part]
    queries = {example.query_id: example.query for example in examples}
    documents = list(dict.fromkeys(column_ids))
    run = teacher.score(corpus, queries, {query_id: documents for query_id in queries})
    return torch.tensor([[run[example.query_id][doc_id] for doc_id in column_ids] for example in examples],
                        dtype=torch.float32)


def pools_fingerprint(pools: list[Pool]) -> str:
    """A digest of what the data order depends on, so a resume on other pools is refused."""
    digest = hashlib.sha256()
    for pool in pools:
        digest.update(json.dumps([pool.query_id, pool.query, [p.doc_id for p in pool.positives],
                                  [n.doc_id for n in pool.negatives]]).encode())
    return "sha256:" + digest.hexdigest()


@dataclass
class TrainResult:
    """What :func:`train` gives back: the trained model (in memory; the same weights as the folder written to
    ``output_dir``) and the summary recorded in ``training_config.json`` (steps, losses, seconds, best dev)."""

    model: DualEncoder
    summary: dict

    def __repr__(self) -> str:  # the dataclass repr would print the whole network
        shown = {key: self.summary[key] for key in ("steps", "final_loss", "best_step", "seconds")
                 if key in self.summary}
        return f"TrainResult(model={self.model.name or type(self.model).__name__!r}, {shown})"


def train(pools: list[Pool], corpus: Corpus, config: TrainConfig, output_dir: str | Path, *,
          model: DualEncoder | object | None = None, loss: torch.nn.Module | str | None = None,
          show_progress: bool = True, provenance: dict | None = None, resume: str | Path | None = None,
          evaluator: Callable[[DualEncoder], float] | None = None,
          on_step: Callable[[int, DualEncoder], None] | None = None,
          remine: Remine | None = None, pools_meta: dict | list | None = None,
          groups: list[str] | None = None, teacher: Scorer | None = None) -> TrainResult:
    """Train on ``pools`` into the run folder ``output_dir``; returns the model and its summary.

    ``output_dir/model/`` is the trained model with its model card (``README.md``) and nothing else, so it can be
    shared as it is; beside it ``logs/`` (``train_log.jsonl``, ``loss_curve.png``, ``tensorboard/``),
    ``checkpoints/step-NNNNNNN/`` and ``training_config.json``.

    ``model``: a :class:`~retriever.encoder.DualEncoder` or a loaded ``SentenceTransformer`` to train (in place: a
    SentenceTransformer shares its weights with the returned model); default: load ``config.model``. The config's
    pooling, normalize, prefixes and max_length, where set, apply to a given DualEncoder; a SentenceTransformer
    keeps its own modules, and a setting that contradicts them is refused. ``loss``: a loss module
    (``retriever.losses``: any :class:`~retriever.losses.RetrievalLoss`, or a
    :class:`~retriever.losses.DistilledLoss`, which reads the teacher scores of the pools) or a loss name; default:
    the one ``config`` describes. ``resume``: ``"latest"`` or a checkpoint/run folder to continue from (its weights
    replace the given model's). ``evaluator`` maps the model to a dev score (higher is better); with
    ``config.eval_steps`` it is called every that many steps and at the end, else after every epoch, and the best
    model is what ``output_dir/model`` holds and what is returned. ``on_step(step, model)`` is called after each
    finished step (and its checkpoint): a hook for custom logging, or to stop a run in a test. ``provenance`` maps
    input files to checksums, recorded beside the model. ``remine`` (needed by ``config.remine_every`` E, see
    :class:`mining.remine.Remining`) gives the pools of re-mining round r, which the epochs from r x E on train on:
    ``remine(model, r)`` mines them with the model at the end of epoch r x E (or reads them when that round is
    finished), ``remine(None, r)`` only reads a finished round (a resume in the middle of it; the other processes of
    a distributed run, after rank 0 mined). ``pools_meta``: how the pools were mined
    (:func:`retriever.data.read_pools_meta`; a list of them for several datasets), for the model card. ``groups``:
    each pool's dataset when training on several (:func:`retriever.mixture.mix` gives pools, corpus and groups);
    every batch is then drawn from one dataset. ``teacher`` (needed by ``config.distill_scope == "batch"``): the
    scorer the pools were mined with (:func:`mining.remine.recorded_teacher` rebuilds it), which scores every
    (query, document) cell of each step for the distillation term.
    """
    if isinstance(loss, str):
        config = replace(config, loss=loss)
        loss = None
    trainer = Trainer(pools, corpus, config, Path(output_dir), model=model, loss=loss, show_progress=show_progress,
                      provenance=provenance, evaluator=evaluator, on_step=on_step, remine=remine,
                      pools_meta=pools_meta, groups=groups, teacher=teacher)
    trainer.restore(resume)
    return trainer.run()


class Trainer:
    """One training run, in the order it happens: check the inputs, :meth:`restore` a checkpoint, then
    :meth:`run` the epochs (:meth:`train_step`, :meth:`evaluate`, :meth:`checkpoint`) and :meth:`finish`.

    :func:`train` is the way to use it; the class exists so each part reads (and can be overridden) alone.
    """

    def __init__(self, pools: list[Pool], corpus: Corpus, config: TrainConfig, output_dir: Path, *,
                 model: DualEncoder | object | None, loss: torch.nn.Module | None, show_progress: bool,
                 provenance: dict | None, evaluator: Callable[[DualEncoder], float] | None,
                 on_step: Callable[[int, DualEncoder], None] | None, remine: Remine | None,
                 pools_meta: dict | list | None = None, groups: list[str] | None = None,
                 teacher: Scorer | None = None) -> None:
        config.check()
        check_report_target(config.report_to)  # a missing extra fails before the model loads
        self.pools, self.corpus, self.config, self.output_dir = pools, corpus, config, output_dir
        self.given_model, self.loss_module = model, loss
        self.show_progress, self.provenance = show_progress, provenance
        self.evaluator, self.on_step, self.remine = evaluator, on_step, remine
        self.pools_meta = pools_meta
        self.groups = groups
        self.mixed = groups is not None and len(set(groups)) > 1
        self.dev_metric = getattr(evaluator, "metric", "score")  # eval.evaluate.dev_evaluator names its metric
        self.reporter: Reporter = Reporter()
        self.distills = isinstance(loss, DistilledLoss) if loss is not None else config.distills
        self.teacher = teacher if self.distills and config.distill_scope == "batch" else None
        self._check_inputs()
        check_output_folder(output_dir, "output_dir")
        self.identity = _config_identity(config)
        self.identity["pools"] = pools_fingerprint(pools)
        if self.mixed:  # the batches depend on the datasets of the pools
            self.identity["groups"] = hashlib.sha256("\n".join(groups).encode()).hexdigest()
        if loss is not None:
            self.identity["loss"] = repr(loss)
        if self.teacher is not None:
            self.identity["teacher"] = describe(self.teacher)
            for part in components(self.teacher):  # its bars would redraw over the training bar every step
                if hasattr(part, "show_progress"):
                    part.show_progress = False
        self.checkpoint_dir: Path | None = None
        self.state: dict | None = None
        self.step, self.log, self.best = 0, [], {"step": None, "score": None, "stale": 0}

    def _check_inputs(self) -> None:
        """Refuse what cannot train, before any model is loaded."""
        pools, config = self.pools, self.config
        missing = sorted({d for pool in pools for d in [p.doc_id for p in pool.positives] + [n.doc_id for n in
                          pool.negatives] if d not in self.corpus})
        if missing:
            raise HardnegError(f"{len(missing)} document ids of the pools are not in the corpus, e.g. {missing[:3]}")
        if not pools:
            raise HardnegError("train: no pools to train on")
        if config.scores_on_dev and self.evaluator is None:
            raise HardnegError("train: eval_steps, patience, dev_fraction and soup need a dev evaluator (the CLI "
                               "and `run` build it from --dev-fraction, --dev-split or --dev-data)")
        if self.groups is not None and len(self.groups) != len(pools):
            raise HardnegError(f"train: groups names {len(self.groups)} pools' datasets, there are {len(pools)} pools")
        if config.remine_every and self.mixed:
            raise HardnegError("train: re-mining (remine_every) works on one dataset; train on several without it")
        if config.remine_every and self.remine is None:
            raise HardnegError("train: remine_every needs the mining settings to re-mine with (the CLI and `run` "
                               "pass them; in Python give remine=mining.remine.Remining(...))")
        if self.distills and config.distill_scope == "batch" and self.teacher is None:
            raise HardnegError("train: distill_scope 'batch' needs the teacher to score each batch with (the CLI and "
                               "`run` rebuild it from the pools' pools.meta.json; in Python pass teacher=, e.g. "
                               "mining.remine.recorded_teacher(...))")
        if self.teacher is not None and self.mixed:
            raise HardnegError("train: distill_scope 'batch' scores one dataset's batches; train on several datasets "
                               "with distill_scope 'pools'")
        if self.teacher is not None:  # a table of precomputed embeddings must hold every training query
            check_tables(self.teacher, self.corpus, {pool.query_id: pool.query for pool in pools})
        if self.distills and self.teacher is None:
            unscored = [(pool.query_id, c.doc_id) for pool in pools for c in [*pool.positives, *pool.negatives]
                        if c.score is None]
            if unscored:
                query_id, doc_id = unscored[0]
                raise HardnegError(f"train: distillation needs a teacher score for every positive and negative; "
                                   f"{len(unscored)} have none, the first document {doc_id!r} of query "
                                   f"{query_id!r} (mine with --teacher, --cross-encoder or --fuse-bm25)")
        given = self.given_model
        if given is not None and not isinstance(given, DualEncoder) and not is_sentence_transformer(given):
            raise HardnegError(f"train: model must be a DualEncoder or a SentenceTransformer, got "
                                   f"{type(self.given_model).__name__} (or give a name in config.model)")

    def restore(self, resume: str | Path | None) -> None:
        """Find the checkpoint to continue from (``"latest"`` or a folder) and check it is this run's."""
        if resume is not None:
            self.checkpoint_dir = find_checkpoint(self.output_dir, resume)
            self.state, saved = load_checkpoint_state(self.checkpoint_dir)
            check_compatible(self.checkpoint_dir, saved["identity"], self.identity, _RESUMABLE_KEYS)
        elif checkpoint_dirs(self.output_dir):
            raise HardnegError(f"{self.output_dir} already holds checkpoints of a run; continue it with --resume "
                               "latest (hardneg run: train.resume=latest), or train into another output folder")

    # ------------------------------------------------------------------------------------------ set-up

    def _set_up(self) -> None:
        """Processes, device, seeds, model, loss, optimizer and schedule (and their restored state)."""
        config = self.config
        distributed.init_from_env()
        self.world, self.rank, self.main = distributed.world_size(), distributed.rank(), distributed.is_main()
        if self.main:
            remove_stale_staging(self.output_dir)  # temp files and half-saved checkpoints of a killed run
        self.device = _device(self.world)
        if config.precision == "fp16" and self.device.type != "cuda":
            raise HardnegError("train: fp16 needs a CUDA GPU (it relies on a loss scaler for CUDA); use bf16 on CPU")
        self.precision = resolve_training_precision(config.precision, self.device)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed + self.rank)
        self.model = self._load_model()
        self.model.trained_in_memory = True  # its weights leave the files it was loaded from: no cached embeddings
        if config.dropout is not None:
            self.model.set_dropout(config.dropout)
        self.model.train()
        if self.loss_module is None:
            self.loss_module = _loss_module(config)
        self.loss_module = self.loss_module.to(self.device)
        self.steps_per_epoch = batches_per_epoch(len(self.pools), config.batch_size, self.groups)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.corpus_ids = None
        if config.random_negatives:
            self.corpus_ids = (group_document_ids(self.corpus, self.groups) if self.mixed else list(self.corpus.ids))
        self.optimizer = self._optimizer()
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(config.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        if self.state is not None:
            self._load_state(self.state)
        if self.main and config.soup:
            soup.drop_after(self.output_dir, self.step)  # a resumed run writes those again
        start_afresh = getattr(self.remine, "start_afresh", None)
        if self.main and config.remine_every and self.state is None and start_afresh is not None:
            start_afresh()  # only a resumed run reads its finished rounds back
        self.trained = distributed.wrap_ddp(self.model)  # the model itself for one process
        self.autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.meta = {"identity": self.identity, "model_identity": _model_identity(self.model),
                     "world_size": self.world}

    def _check_memory(self) -> None:
        """Refuse, before the first step, a step that cannot fit in memory (:mod:`retriever.memory`), judged on
        the texts of the step the run starts with."""
        if self.step >= self.total_steps:
            return
        epoch = self.step // self.steps_per_epoch
        batch = epoch_batches(self.pools, self.config, epoch, self.corpus_ids, self.groups)[
            self.step - epoch * self.steps_per_epoch]
        problem = None
        if own := rank_slices(batch, self.world)[self.rank]:
            queries, columns, _ = batch_columns(own)
            try:
                check_step_memory(self.model, queries, [self.corpus.text_of(d) for d in columns],
                                  chunk_size=self.config.cache_chunk, precision=self.precision, device=self.device,
                                  batch_size=self.config.batch_size, processes_here=distributed.local_world_size())
            except HardnegError as err:
                problem = str(err)
        # every rank stops if one would run out, rather than the others waiting for it in the first step
        problems = [p for p in distributed.all_gather_objects(problem) if p]
        if problems:
            raise HardnegError(problems[0])

    def _load_model(self) -> DualEncoder:
        config = self.config
        options = {"pooling": config.pooling, "normalize": config.normalize, "query_prefix": config.query_prefix,
                   "document_prefix": config.document_prefix, "max_length": config.max_length}
        if self.checkpoint_dir is not None:
            model = DualEncoder.load(self.checkpoint_dir / "model", **options, device=self.device)
            if self.given_model is not None:  # train the given object on, with the checkpoint's weights
                given = _as_dual_encoder(self.given_model).to(self.device)
                given.model.load_state_dict(model.model.state_dict())
                model = given
        elif self.given_model is not None:
            model = _as_dual_encoder(self.given_model).to(self.device)
        else:
            model = DualEncoder.load(config.model, **options, device=self.device)
        if self.given_model is not None:
            _apply_model_settings(model, options, sentence_transformer=not isinstance(self.given_model, DualEncoder))
        model.name = config.model if self.given_model is None else (model.name or config.model)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW without weight decay on biases and norms; a learnable temperature in its own group."""
        no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not any(k in n for k in no_decay)],
                   "weight_decay": self.config.weight_decay},
                  {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}]
        if list(self.loss_module.parameters()):
            groups.append({"params": list(self.loss_module.parameters()), "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=self.config.learning_rate)

    def _load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_module.load_state_dict(state["loss"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.log, self.best = state["step"], list(state["log"]), dict(state["best"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        elif self.main:
            warnings.warn(f"resuming on {self.world} processes, the checkpoint has {len(rngs)}: the data order is "
                          "the same, the dropout RNG is not", stacklevel=3)

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        """Every epoch from the restored position on; then :meth:`finish`."""
        self._set_up()
        self._check_memory()
        config = self.config
        self.started, self.examples_seen = time.time(), 0
        self.last_checkpoint = self.started  # when the last checkpoint was written (the run's start, at first)
        self.current_round, self.rounds = 0, []
        self.reporter = (open_reporter(config.report_to, self.output_dir / TENSORBOARD_DIR, first_step=self.step)
                         if self.main else Reporter())
        if self.step == 0:
            self._report_pools()
        self.stop_signal = StopSignal()
        try:
            name = config.loss if self.identity.get("loss") is None else type(self.loss_module).__name__
            with self.stop_signal, tqdm(total=self.total_steps, initial=self.step, desc=f"train {name}", unit="step",
                                        disable=not (self.show_progress and self.main)) as bar:
                for epoch in range(self.step // self.steps_per_epoch, config.epochs):
                    if self.step >= self.total_steps or self._stopped_early():
                        break
                    if config.remine_every and epoch // config.remine_every != self.current_round:
                        self._next_round(epoch)
                    if not self._run_epoch(epoch, bar):
                        break
                    if not config.save_steps and self.step < self.total_steps:
                        self.checkpoint(safety_net=True)  # a run that saves nothing else still resumes
        except HardnegError:
            raise
        except BaseException:
            if self.main and self.log:
                _write_log(self.output_dir, self.log)
            self.reporter.close()
            raise
        result = self.finish()
        self.stop_signal.obey()  # a stop asked during the last step: the model is saved, end as asked
        return result

    def _next_round(self, epoch: int) -> None:
        """Replace the pools by those of the re-mining round that starts at ``epoch``."""
        self.current_round = epoch // self.config.remine_every
        at_boundary = self.step == epoch * self.steps_per_epoch and epoch % self.config.remine_every == 0
        self.pools = _remined_pools(self.remine, self.model if at_boundary else None, self.current_round,
                                    self.pools, self.main)
        self.rounds.append({"round": self.current_round, "epoch": epoch, "step": self.step})
        self._report_pools()

    def _report_pools(self) -> None:
        """The pools a round trains on, as the reporter's mining counts (round 0: the pools given)."""
        with_negatives = sum(1 for pool in self.pools if pool.negatives)
        self.reporter.scalars(self.step, {"mining/round": self.current_round,
                                          "mining/queries_with_negatives": with_negatives,
                                          "mining/negatives_per_query":
                                              sum(len(p.negatives) for p in self.pools) / len(self.pools)})

    def _run_epoch(self, epoch: int, bar: tqdm) -> bool:
        """The remaining steps of ``epoch``; False when training ends inside it (early stop)."""
        batches = epoch_batches(self.pools, self.config, epoch, self.corpus_ids, self.groups)
        for index in range(self.step - epoch * self.steps_per_epoch, len(batches)):
            if self.step >= self.total_steps:
                break
            record = self.train_step(batches[index], epoch, index)
            if record is None:
                continue
            if self._evaluation_due(index == len(batches) - 1):
                self.evaluate()
            best = {} if self.best.get("score") is None else {"best_dev": f"{self.best['score']:.4f}"}
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", ex_s=record["examples_per_s"],
                            **best)
            bar.update(1)
            if self.step < self.total_steps:  # the last step's checkpoint is the model folder
                net_due, stop = self._rank0_decides(not self.config.save_steps and index < len(batches) - 1)
                written = bool(self.config.save_steps and self.step % self.config.save_steps == 0) or net_due
                if written:
                    self.checkpoint(safety_net=net_due)  # a net: inside a long epoch (its end writes one anyway)
                if stop:
                    self._end_on_signal(stop, written)
            if self.on_step is not None:
                self.on_step(self.step, self.model)
            if self._stopped_early():
                return False
        return True

    def train_step(self, batch: list[QueryExample], epoch: int, index: int) -> dict | None:
        """One optimizer step on ``batch``; returns its log record (None for a batch too small to split)."""
        tick = time.time()
        slices = rank_slices(batch, self.world)
        if any(not part for part in slices):  # fewer queries than processes: nothing to split
            self.step += 1
            self.scheduler.step()
            return None
        loss = _train_step(self.trained, self.loss_module, slices, self.rank, self.corpus, self.config,
                           self.autocast, self.scaler, self.device, self.distills, self.teacher)
        if not math.isfinite(loss):
            self._refuse_non_finite(loss, epoch, index, batch)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.examples_seen += len(batch)
        record = {"step": self.step, "epoch": epoch, "loss": round(loss, 6), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": round(float(grad_norm), 6),
                  "examples_per_s": round(len(batch) / (time.time() - tick), 2)}
        if self.config.learnable_temperature:
            record["temperature"] = round(float(self.loss_module.temperature.detach()), 6)
        self.log.append(record)
        self.reporter.scalars(self.step, {"train/loss": loss, "train/learning_rate": record["lr"],
                                          "train/grad_norm": record["grad_norm"],
                                          "train/temperature": record.get("temperature", self._fixed_temperature()),
                                          "train/examples_per_second": record["examples_per_s"]})
        return record

    def _fixed_temperature(self) -> float | None:
        temperature = getattr(self.loss_module, "temperature", None)
        return float(temperature) if isinstance(temperature, (int, float)) else None

    def _refuse_non_finite(self, loss: float, epoch: int, index: int, batch: list[QueryExample]) -> None:
        if self.main:
            _write_log(self.output_dir, self.log)
        last = checkpoint_dirs(self.output_dir)
        raise HardnegError(
            f"train: loss is {loss} at step {self.step + 1} (epoch {epoch}, batch {index} of the epoch, queries "
            f"{', '.join(e.query_id for e in batch[:5])}{', ...' if len(batch) > 5 else ''}); "
            "stopped without updating the model" + (f"; the last good checkpoint is {last[-1]}" if last else "")
            + ". Lower the learning rate, raise the temperature, or use fp32/bf16")

    # ------------------------------------------------------------------------ dev, checkpoints, the end

    def _evaluation_due(self, epoch_done: bool) -> bool:
        if self.evaluator is None:
            return False
        if self.config.eval_steps:
            return self.step % self.config.eval_steps == 0 or self.step == self.total_steps
        return epoch_done or self.step == self.total_steps

    def _stopped_early(self) -> bool:
        """Patience ran out: that many dev evaluations in a row without a new best."""
        return bool(self.config.patience) and self.best.get("stale", 0) >= self.config.patience

    def evaluate(self) -> None:
        """Score the model on dev (rank 0); a new best is saved to ``output_dir/model`` (what the run gives)."""
        if self.main:
            saved_rng = rng_state()  # evaluation must not shift the dropout RNG of the training
            with alone():  # the other ranks wait at the barrier below, not in the dev search
                score = float(self.evaluator(self.model))
            set_rng_state(saved_rng)
            self.model.train()
            self.log[-1]["dev"] = round(score, 6)
            self.reporter.scalars(self.step, {f"dev/{self.dev_metric}": score})
            if self.best["score"] is None or score > self.best["score"]:
                self.best.update(step=self.step, score=score, stale=0)
                self.model.save(self.output_dir / MODEL_DIR)
            else:
                self.best["stale"] = self.best.get("stale", 0) + 1
            if self.config.soup:
                soup.save_ingredient(self.output_dir, self.step, self.model.model)
                soup.prune(self.output_dir, self._dev_scores(), self.config.soup)
            _write_log(self.output_dir, self.log)  # each dev score readable while a long run goes on
        distributed.barrier()
        self.best["stale"] = distributed.broadcast_int(self.best.get("stale", 0))

    def _dev_scores(self) -> dict[int, float]:
        """Step -> dev score of every evaluation so far (the log holds them, across a resume too)."""
        return {record["step"]: record["dev"] for record in self.log if "dev" in record}

    def _make_soup(self) -> dict:
        """The greedy soup of the best dev-evaluated models (rank 0); saved as the model when it beats the best."""
        saved_rng = rng_state()

        def score(state: dict) -> float:
            self.model.model.load_state_dict(state)
            with alone():
                return float(self.evaluator(self.model))

        made = soup.greedy_soup(self.output_dir, self._dev_scores(), score)
        set_rng_state(saved_rng)
        kept = made.pop("state")
        if kept is not None:
            self.model.model.load_state_dict(kept)
            self.model.save(self.output_dir / MODEL_DIR)
        made["kept"] = kept is not None
        soup.remove(self.output_dir)
        return made

    def _end_on_signal(self, number: int, written: bool) -> None:
        """Checkpoint the step just finished (unless its own checkpoint was), say how to continue, and end as the
        signal asked: a job stopped by its scheduler loses no step."""
        if not written:
            self.checkpoint(safety_net=not self.config.save_steps)
        if self.main:
            sys.stderr.write(f"hardneg train: {signal.Signals(number).name} at step {self.step} of "
                             f"{self.total_steps}: checkpoint {checkpoint_dirs(self.output_dir)[-1]} written; "
                             "continue with --resume latest "
                             "(hardneg run: the same command again)\n")
        self.reporter.close()
        self.stop_signal.obey(number)
        # still here: the handler from before training took the signal and returned, so stop with a clear line
        raise HardnegError(f"stopped by {signal.Signals(number).name} at step {self.step}; continue with "
                           "--resume latest")

    def _rank0_decides(self, net_wanted: bool) -> tuple[bool, int]:
        """(whether a safety net is due, the stop signal received or 0), as rank 0 sees them: every rank must take
        part in a checkpoint, so rank 0's clock and signal decide for all, in one broadcast per step. A net is due
        once :data:`SAFETY_NET_SECONDS` have passed since the last checkpoint (``net_wanted``: this step may take
        one)."""
        due = net_wanted and time.time() - self.last_checkpoint >= SAFETY_NET_SECONDS
        stop = self.stop_signal.received or 0
        if self.world > 1:
            packed = distributed.broadcast_int(stop * 2 + int(due))
            due, stop = bool(packed % 2), packed // 2
        return due, stop

    def checkpoint(self, safety_net: bool = False) -> None:
        """Everything an exact resume needs, written by rank 0 (every rank's RNG state gathered first).

        ``safety_net``: a checkpoint of a run without ``save_steps`` (at the end of each epoch but the last, and
        every :data:`SAFETY_NET_SECONDS` inside one), marked as such; it replaces the previous one of its kind and
        never removes a checkpoint the user asked for."""
        rngs = _all_rng_states(self.world)
        if self.main:
            epoch = self.step // self.steps_per_epoch
            trainer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                             "loss": self.loss_module.state_dict(),
                             "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rngs,
                             "step": self.step, "epoch": epoch, "log": self.log, "best": self.best}
            save_checkpoint(self.output_dir, self.step, self.model, trainer_state,
                            self.meta | {"step": self.step, "epoch": epoch, "total_steps": self.total_steps,
                                         "best": self.best, "config": asdict(self.config),
                                         SAFETY_NET: safety_net},
                            None if safety_net else self.config.save_total_limit)
            if safety_net:
                remove_safety_nets(self.output_dir, keep=self.step)
            _write_log(self.output_dir, self.log)
        distributed.barrier()
        self.last_checkpoint = time.time()

    def finish(self) -> TrainResult:
        """The last checkpoint, the model folder and its card, the log, the loss plot and ``training_config.json``.

        With dev selection the model folder already holds the best model, and the returned model takes its
        weights (as ``load_best_model_at_end`` in HF's Trainer); otherwise it is the model of the last step.
        """
        config, log = self.config, self.log
        if config.save_steps:
            self.checkpoint()
        elif self.main:
            remove_safety_nets(self.output_dir)  # the model folder is the result
        summary = {"steps": self.step, "epochs": config.epochs,
                   "epochs_run": round(self.step / self.steps_per_epoch, 3), "stopped_early": self._stopped_early(),
                   "queries_per_epoch": len(self.pools), "first_loss": log[0]["loss"] if log else None,
                   "final_loss": log[-1]["loss"] if log else None, "seconds": round(time.time() - self.started, 1),
                   "examples_seen_this_session": self.examples_seen,
                   "resumed_from": str(self.checkpoint_dir) if self.checkpoint_dir else None,
                   "world_size": self.world, "precision": self.precision, "best_step": self.best["step"],
                   "best_dev": self.best["score"], "dev_metric": self.dev_metric if self.evaluator else None}
        if config.remine_every:
            summary["remine_rounds"] = self.rounds
        if self.mixed:
            summary["datasets"] = {name: self.groups.count(name) for name in dict.fromkeys(self.groups)}
        if any("temperature" in r for r in log):
            summary["final_temperature"] = log[-1].get("temperature")
        model_dir = self.output_dir / MODEL_DIR
        if self.main and config.soup and self.best["step"] is not None:
            summary["soup"] = self._make_soup()
            if summary["soup"]["kept"]:
                summary["best_dev"] = summary["soup"]["dev"]
        if self.main:
            if self.best["step"] is None:
                self.model.save(model_dir)
            _write_log(self.output_dir, log)
            _plot_losses(self.output_dir / LOSS_PLOT, log, self.dev_metric)
            corpus = self.corpus
            corpus_checksum = {str(corpus.path): file_checksum(corpus.path)} if corpus.path else {}
            record = {"config": asdict(config), "summary": summary, "model_identity": self.meta["model_identity"],
                      "mining": self.pools_meta, "library_versions": library_versions(),
                      "input_checksums": corpus_checksum | (self.provenance or {})}
            write_json(self.output_dir / TRAIN_CONFIG, record)
            write_model_card(model_dir, record)
        self.reporter.close()
        distributed.barrier()
        if self.best["step"] is not None:  # every rank continues with the selected weights
            _load_weights(self.model, model_dir)
        return TrainResult(self.model, summary)


def _train_step(trained, loss_module, slices, rank, corpus, config, autocast, scaler, device,
                distills: bool, teacher: Scorer | None = None) -> float:
    """Encode this process's slice, score it against the gathered global batch, back-propagate."""
    positive_ids, column_ids, target_columns = global_layout(slices)
    targets, negatives = build_masks(positive_ids, column_ids, target_columns)
    targets, negatives = targets.to(device), negatives.to(device)
    extra = ()
    if teacher is not None:  # every cell of the batch, scored by the teacher now
        scores = batch_teacher_scores(teacher, corpus, slices)
        extra = (scores.to(device), torch.ones(targets.shape, dtype=torch.bool, device=device))
    elif distills:
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
        with alone():
            fresh = remine(model, round_number)
    distributed.barrier()
    if not main:
        fresh = remine(None, round_number)
    if sorted(p.query_id for p in fresh) != sorted(p.query_id for p in pools):
        raise HardnegError(f"train: re-mining round {round_number} gave pools for other queries than training "
                           f"uses ({len(fresh)} against {len(pools)}); the steps per epoch would change")
    return fresh


def _apply_model_settings(model: DualEncoder, options: dict, *, sentence_transformer: bool) -> None:
    """The config's pooling, normalisation, prefixes and token limit (those set) on a given model object.

    A DualEncoder takes them. A SentenceTransformer is trained in place and keeps encoding with its own
    modules afterwards, so a setting that would make hardneg train it differently from how it encodes is refused.
    """
    for key, value in options.items():
        current = getattr(model, key)
        if value is None or value == current:
            continue
        if sentence_transformer:
            raise HardnegError(f"train: {key}={value!r} differs from the given SentenceTransformer's {current!r}; "
                               f"set it on the SentenceTransformer (trained in place), or leave {key} unset")
        setattr(model, key, value)


def _as_dual_encoder(model: object) -> DualEncoder:
    return model if isinstance(model, DualEncoder) else DualEncoder.from_sentence_transformer(model)


def _config_identity(config: TrainConfig) -> dict:
    """The training settings as a checkpoint's identity records them (``config.<field>``)."""
    return {f"config.{key}": value for key, value in asdict(config).items()}


_RESUMABLE_KEYS = tuple(f"config.{key}" for key in RESUMABLE_CHANGES)


def check_resume(output_dir: str | Path, resume: str | Path, config: TrainConfig, flag: str = "--resume") -> Path:
    """The checkpoint ``resume`` names (``"latest"`` in ``output_dir``, or a folder), refused before any work when
    there is none or it was written with other training settings; the pools and the model it trained are
    checked when training starts (a pipeline mines its pools first). ``flag``: the setting errors name."""
    checkpoint = find_checkpoint(output_dir, resume, flag)
    saved = load_checkpoint_summary(checkpoint).get("identity") or {}
    current = _config_identity(config)
    check_compatible(checkpoint, {key: value for key, value in saved.items() if key.startswith("config.")},
                     current, _RESUMABLE_KEYS)
    return checkpoint


def check_memory_before_mining(config: TrainConfig, dataset: Dataset) -> None:
    """The first step's memory check (:mod:`retriever.memory`) before the pools exist, for ``hardneg run``: a
    refusal after mining would cost the mining again. The step is stood in for by ``batch_size`` training queries
    (seeded) with their positives and random corpus documents in place of the mined and random negatives: the
    same count of texts, lengths drawn from the same corpus. The trainer checks the real first step again."""
    queries = sorted(q for q in dataset.queries if dataset.relevant(q))
    if not queries or not len(dataset.corpus):
        return
    rng = random.Random(config.seed)
    chosen = rng.sample(queries, min(config.batch_size, len(queries)))
    per_query = config.negatives_per_query + (config.random_negatives or 0)
    documents = []
    for query_id in chosen:
        positives = sorted(dataset.relevant(query_id))[:config.positives_per_query]
        documents += [dataset.corpus.text_of(d) for d in positives]
        documents += [dataset.corpus.text(rng.randrange(len(dataset.corpus))) for _ in range(per_query)]
    device = default_device()
    model = DualEncoder.load(config.model, pooling=config.pooling, normalize=config.normalize,
                             query_prefix=config.query_prefix, document_prefix=config.document_prefix,
                             max_length=config.max_length, device=device)
    if config.dropout is not None:
        model.set_dropout(config.dropout)
    model.train()
    check_step_memory(model, [dataset.queries[q] for q in chosen], documents, chunk_size=config.cache_chunk,
                      precision=resolve_training_precision(config.precision, device), device=device,
                      batch_size=config.batch_size)


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
            "pooling": model.pooling, "normalize": model.normalize, "max_length": model.max_length,
            "query_prefix": model.query_prefix, "document_prefix": model.document_prefix}


def _all_rng_states(world: int) -> list[dict]:
    """Every process's RNG states (rank order), so each resumes its own dropout stream."""
    if world == 1:
        return [rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def _load_weights(model: DualEncoder, folder: Path) -> None:
    """Give ``model`` the weights saved in the model folder ``folder`` (the best on dev)."""
    saved = type(model.model).from_pretrained(folder)
    model.model.load_state_dict(saved.state_dict())


def _write_log(output_dir: Path, log: list[dict]) -> None:
    with atomic_write(output_dir / TRAIN_LOG) as handle:
        handle.writelines(json.dumps(record) + "\n" for record in log)


def _plot_losses(path: Path, log: list[dict], dev_metric: str) -> None:
    """The training loss per step, its running mean when there are enough steps to smooth, and the dev score
    (named by its metric) at each evaluation, as a PNG."""
    if not log:
        return
    try:
        figure = new_figure(7, 4)
    except ImportError:  # plotting is a convenience; training results do not depend on it
        warnings.warn("matplotlib is not installed: no loss plot written", stacklevel=2)
        return
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    axis = figure.subplots()
    window = len(losses) // 20
    if window >= 2:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
        axis.plot(steps[window - 1:], smooth, color="tab:blue", label=f"running mean of {window} steps")
    else:
        axis.plot(steps, losses, "o-" if len(steps) < 30 else "-", color="tab:blue", label="loss per step")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.xaxis.get_major_locator().set_params(integer=True)
    dev = [(r["step"], r["dev"]) for r in log if "dev" in r]
    if dev:
        other = axis.twinx()
        other.plot(*zip(*dev), "o-", color="tab:orange", label=f"dev {dev_metric}")
        other.set_ylabel(f"dev {dev_metric}")
        other.legend(loc="upper right")
    axis.legend(loc="upper left" if dev else "best")
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
