"""``train``: fit a dual encoder on mined pools with InfoNCE over in-batch and hard negatives.

Each epoch, every pool yields ``positives_per_query`` examples, each a (query, one of its positives,
``negatives_per_query`` of its mined negatives) triple drawn with a seeded generator; examples are
shuffled and batched. A batch scores every query against every document in it, masking any document
that is a labelled positive of that query (see :mod:`retriever.losses`). AdamW with linear warm-up
then linear decay, as in sentence-transformers and Tevatron.

Determinism: the same pools, config and seed give the same batches in the same order; weights then
differ only by floating-point non-determinism of the kernels (none on CPU in our tests, possible on
GPU with non-deterministic cuBLAS/atomics).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from retriever.data import Corpus, Pool
from retriever.encoder import DualEncoder
from retriever.io import HardnegError, atomic_write, file_checksum, library_versions, write_json
from retriever.losses import false_negative_mask, info_nce

TRAIN_LOG = "train_log.jsonl"
TRAIN_CONFIG = "training_config.json"


@dataclass
class TrainConfig:
    model: str = "all-MiniLM-L6-v2"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    positives_per_query: int = 1
    negatives_per_query: int = 1
    max_length: int | None = None
    pooling: str | None = None
    normalize: bool | None = None
    query_prefix: str | None = None
    document_prefix: str | None = None
    max_grad_norm: float = 1.0
    seed: int = 42

    def check(self) -> None:
        """Refuse settings that cannot train before the model is loaded."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "temperature": self.temperature, "positives_per_query": self.positives_per_query}
        for name, value in positive.items():
            if not value > 0:
                raise HardnegError(f"train: {name} must be positive, got {value}")
        if self.negatives_per_query < 0:
            raise HardnegError(f"train: negatives_per_query must be >= 0, got {self.negatives_per_query}")
        if not 0 <= self.warmup_ratio < 1:
            raise HardnegError(f"train: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class Example:
    query: str
    positive: str
    negatives: list[str]
    positive_ids: set[str]


def epoch_examples(pools: list[Pool], config: TrainConfig, epoch: int) -> list[Example]:
    """The shuffled examples of one epoch, a pure function of (pools, config, epoch)."""
    rng = random.Random(config.seed * 1_000_003 + epoch)
    examples = []
    for pool in pools:
        positive_ids = {p.doc_id for p in pool.positives}
        ordered_positives = [p.doc_id for p in pool.positives]
        chosen = rng.sample(ordered_positives, min(config.positives_per_query, len(ordered_positives)))
        negative_ids = [n.doc_id for n in pool.negatives]
        for positive in chosen:
            negatives = rng.sample(negative_ids, min(config.negatives_per_query, len(negative_ids)))
            examples.append(Example(pool.query, positive, negatives, positive_ids))
    rng.shuffle(examples)
    return examples


def batch_tensors(batch: list[Example]) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """Query texts, document ids (positives first, then hard negatives), labels and false-negative mask."""
    queries = [example.query for example in batch]
    doc_ids = [example.positive for example in batch] + [n for example in batch for n in example.negatives]
    labels = list(range(len(batch)))
    mask = false_negative_mask([example.positive_ids for example in batch], doc_ids, labels)
    return queries, doc_ids, torch.tensor(labels), mask


def train(pools: list[Pool], corpus: Corpus, config: TrainConfig, output_dir: str | Path, *,
          show_progress: bool = True, provenance: dict | None = None) -> dict:
    """Train and save a model folder to ``output_dir``; returns a summary (steps, final loss, seconds).

    ``provenance`` maps input files (e.g. the pools file) to their checksums, recorded beside the model
    with the config, the seed and the library versions.
    """
    config.check()
    output_dir = Path(output_dir)
    missing = sorted({d for pool in pools for d in [p.doc_id for p in pool.positives] + [n.doc_id for n in
                      pool.negatives] if d not in corpus})
    if missing:
        raise HardnegError(f"{len(missing)} document ids of the pools are not in the corpus, e.g. {missing[:3]}")

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = DualEncoder.load(config.model, pooling=config.pooling, normalize=config.normalize,
                             query_prefix=config.query_prefix, document_prefix=config.document_prefix,
                             max_length=config.max_length)
    model.train()
    steps_per_epoch = math.ceil(sum(min(config.positives_per_query, len(p.positives)) for p in pools)
                                / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    log = []
    started = time.time()
    step = 0
    with tqdm(total=total_steps, desc="train", unit="step", disable=not show_progress) as bar:
        for epoch in range(config.epochs):
            examples = epoch_examples(pools, config, epoch)
            for start in range(0, len(examples), config.batch_size):
                batch = examples[start:start + config.batch_size]
                tick = time.time()
                queries, doc_ids, labels, mask = batch_tensors(batch)
                query_vectors = model.embed(queries, is_query=True)
                doc_vectors = model.embed([corpus.text_of(d) for d in doc_ids], is_query=False)
                loss = info_nce(query_vectors, doc_vectors, labels, mask, config.temperature)
                if not torch.isfinite(loss):
                    raise HardnegError(f"train: loss is {loss.item()} at step {step + 1} (epoch {epoch}, "
                                       f"examples {start}-{start + len(batch) - 1}); lower the learning rate "
                                       "or raise the temperature")
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 6),
                          "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                          "examples_per_s": round(len(batch) / (time.time() - tick), 2)}
                log.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                ex_s=record["examples_per_s"])
                bar.update(1)

    model.save(output_dir)
    with atomic_write(output_dir / TRAIN_LOG) as handle:
        handle.writelines(json.dumps(record) + "\n" for record in log)
    summary = {"steps": step, "epochs": config.epochs, "examples_per_epoch": len(examples) if step else 0,
               "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
               "seconds": round(time.time() - started, 1)}
    corpus_checksum = {str(corpus.path): file_checksum(corpus.path)} if corpus.path else {}
    write_json(output_dir / TRAIN_CONFIG, {"config": asdict(config), "summary": summary,
                                           "library_versions": library_versions(),
                                           "input_checksums": corpus_checksum | (provenance or {})})
    return summary
