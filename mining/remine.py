"""Dynamic negatives (``--remine-every E``): re-mine the training queries with the model being trained.

Negatives mined once, with the starting model or BM25, go stale as the model learns: after an epoch it ranks
other documents on top, and those are the negatives it now needs (ANCE, ADORE/STAR). :class:`Remining` is the
hook :func:`retriever.train.train` calls after every E epochs with the model as it is then. It re-encodes the
corpus with that model and mines the same queries again with the same settings:

* the model being trained takes the place of the dense retriever(s) of the original sources; BM25 stays when
  it was fused with a dense source, and BM25 alone is replaced by the model (BM25 again would give the same
  pools);
* the rescorer (teacher or cross-encoder), depth, filter, anchor and fallback, sampling and seed stay, so a
  teacher still gives the scores the filter and the distillation read; with ``fuse_bm25`` and no teacher the
  fused scorer is the model being trained plus BM25, as it was for the first mining;
* the student's embeddings are never cached on disk (its weights change every round); the teacher's are, in the
  same cache as ``hardneg mine``, so its corpus is encoded once for the first mining and every round.

Round ``r`` is written to ``<train output>/remined/round-<r>/`` with its own mining report, histogram and
meta, like any ``hardneg mine`` output; a finished round is read back instead of mined again, so a resumed
run trains round r on exactly the pools it had. Mining a round itself resumes shard by shard.

Pools that ``hardneg mine`` did not write (no ``pools.meta.json`` with the settings, e.g. converted from a
run file or another tool) cannot be re-mined, and are refused before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from mining.mine import mine
from mining.settings import MineSettings
from mining.sources import build_rescorer, build_source
from retriever.data import (
    POOLS_FILE,
    POOLS_META,
    Corpus,
    Dataset,
    Pool,
    pools_dataset,
    pools_file,
    read_pools,
    read_pools_meta,
)
from retriever.dense import DenseRetriever
from retriever.encoder import DualEncoder
from retriever.io import DataError, HardnegError
from retriever.protocol import Scorer, describe
from retriever.settings import from_arguments

REMINED_DIR = "remined"  # the pools of each re-mining round, OUTPUT/remined/round-R/


def is_bm25(spec: object) -> bool:
    return isinstance(spec, str) and spec.split(":")[0].lower() == "bm25"


class Remining:
    """The re-mining hook of :func:`retriever.train.train`: ``remining(model, round)`` -> that round's pools.

    ``model`` is the model at the end of epoch ``round x E``; None asks for a finished round only (a resume in
    the middle of a round, or the other processes of a distributed run), and is refused when it is missing.
    """

    def __init__(self, dataset: Dataset, settings: MineSettings, output_dir: str | Path, *,
                 encode: dict | None = None, echo: Callable[[str], None] | None = None,
                 config: dict | None = None) -> None:
        settings.check()
        self.dataset = dataset
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.encode = dict(encode or {})
        self.echo = echo or (lambda message: None)
        self.config = config or {}
        self._rescorer: object | None = None
        self.rounds: list[dict] = []

    def start_afresh(self) -> None:
        """Remove the rounds an earlier run left in this folder (a finished run, or one of another config): they
        were mined by another model, and a run that does not resume mines its own."""
        shutil.rmtree(self.output_dir / REMINED_DIR, ignore_errors=True)

    def folder(self, round_number: int) -> Path:
        return self.output_dir / REMINED_DIR / f"round-{round_number}"

    def __call__(self, model: DualEncoder | None, round_number: int) -> list[Pool]:
        folder = self.folder(round_number)
        if (folder / POOLS_META).is_file():  # the meta is written last: a finished round
            pools = read_pools(folder / POOLS_FILE, self.dataset.corpus)
            self._record(round_number, json.loads((folder / POOLS_META).read_text(encoding="utf-8")), reused=True)
            return pools
        if model is None:
            raise HardnegError(f"{folder}: the pools of re-mining round {round_number} are missing or unfinished, "
                               "and the checkpoint is past the end of the epoch they were mined at; resume from "
                               "a checkpoint at or before that epoch's end, or train afresh")
        settings = self.settings
        student = DenseRetriever(model, batch_size=self.encode.get("batch_size", 64),
                                 show_progress=self.encode.get("show_progress", True), index=settings.index,
                                 nprobe=settings.nprobe, ef_search=settings.ef_search, cache_dir=None)
        bm25 = [spec for spec in settings.retriever if is_bm25(spec)]
        specs = [*bm25, student] if len(bm25) < len(settings.retriever) else [student]
        source = build_source(specs, bm25_backend=settings.bm25_backend, rrf_k=settings.rrf_k,
                              show_progress=self.encode.get("show_progress", True))
        rescores_with_student = settings.fuse_bm25 is not None and not settings.teacher
        if rescores_with_student or (self._rescorer is None and (settings.teacher or settings.cross_encoder)):
            # a teacher is built once for every round; a fusion with the student itself is built anew around it
            self._rescorer = build_rescorer(cross_encoder=settings.cross_encoder, teacher=settings.teacher,
                                            cross_encoder_batch_size=settings.cross_encoder_batch_size,
                                            fuse_bm25=settings.fuse_bm25, source=source,
                                            bm25_backend=settings.bm25_backend, **self.encode)
        self.echo(f"re-mining round {round_number}: {len(self.dataset.queries)} queries with {describe(source)}"
                  + (f", rescored by {describe(self._rescorer)}" if self._rescorer is not None else ""))
        result = mine(self.dataset, source, depth=settings.depth, num_negatives=settings.num_negatives,
                      filter=settings.build_filter(), anchor=settings.anchor,
                      anchor_fallback=settings.anchor_fallback, sampling=settings.sampling, seed=settings.seed,
                      output_dir=folder, config=self.config | {"remine_round": round_number},
                      rescorer=self._rescorer, shard_size=settings.shard_size,
                      show_progress=self.encode.get("show_progress", True))
        self.echo("  " + result.summary().replace("\n", "\n  "))
        self._record(round_number, result.meta, reused=False)
        return result.pools

    def _record(self, round_number: int, meta: dict, *, reused: bool) -> None:
        counts = meta.get("counts", {})
        self.rounds = [r for r in self.rounds if r["round"] != round_number]
        self.rounds.append({"round": round_number, "folder": str(self.folder(round_number)), "reused": reused,
                            "queries": counts.get("queries"),
                            "queries_with_hard_negatives": counts.get("queries_with_hard_negatives"),
                            "negatives_written": counts.get("negatives_written")})


def recorded_mine_settings(pools_path: str | Path, model: str, *, as_mined: bool = False) -> MineSettings:
    """The settings the pools at ``pools_path`` were mined with, from their ``pools.meta.json``.

    ``hardneg mine`` records its arguments, ``hardneg run`` its whole config. For re-mining, a dense source that
    is the model being trained (``model``, or the run's own model) is written ``"model"`` (the student takes its
    place); ``as_mined`` keeps the model that actually mined instead, to rebuild the pools' teacher
    (:func:`recorded_teacher`). Pools without such a record are refused.
    """
    path = pools_file(pools_path)
    meta_path = path.parent / POOLS_META
    needs = "--distill-scope batch rebuilds the teacher the pools were scored with" if as_mined else \
        "--remine-every re-mines with the settings the pools were mined with"
    hint = f"{needs}, so it needs pools written by `hardneg mine` or `hardneg run`"
    meta = read_pools_meta(path)
    if meta is None:
        raise DataError(meta_path, f"not found: these pools carry no record of how they were mined; {hint}")
    config = meta.get("config") or {}
    names = {field.name for field in dataclasses.fields(MineSettings)}
    if isinstance(config.get("mine"), dict):  # a `hardneg run` config: resolved values
        given = dict(config["mine"]) | {"seed": config.get("seed", 42)}
        settings = MineSettings(**{key: value for key, value in given.items() if key in names})
        mined_with = config.get("model")
    elif config.get("command") == "mine":  # the flags as parsed: read back the way the command read them
        settings = from_arguments(MineSettings, argparse.Namespace(**config))
        mined_with = None
    else:
        raise DataError(meta_path, f"field 'config': no mining settings recorded; {hint}")
    if as_mined:
        settings.retriever = [mined_with if spec == "model" and mined_with else spec for spec in settings.retriever]
    else:
        settings.retriever = ["model" if spec in (model, mined_with) and not is_bm25(spec) else spec
                              for spec in settings.retriever]
    try:
        settings.check()
    except HardnegError as err:
        raise DataError(meta_path, f"the recorded mining settings are not usable ({err})",
                        field="config") from None
    return settings


def check_batch_teacher(settings: MineSettings, *, remine_every: int) -> None:
    """Refuse in-batch distillation whose teacher would not be the pools' own: a BM25 fusion without a teacher
    model fuses the student as it mined, and re-mining rebuilds that fusion around the student each round,
    while the batch teacher stays the first round's."""
    if remine_every and settings.fuse_bm25 is not None and not settings.teacher:
        raise HardnegError("distill_scope 'batch' with re-mining: the pools' teacher fuses BM25 with the student "
                           "itself (fuse_bm25 without a teacher model), which changes every round; distill over "
                           "the pools' scores (distill_scope pools) or mine with a teacher model")


def recorded_teacher(settings: MineSettings, **encode_options) -> Scorer:
    """The scorer the pools' scores came from, built again from their mining ``settings``
    (:func:`recorded_mine_settings` with ``as_mined``), to score every (query, document) cell of a training batch
    (``train.distill_scope: batch``). A fusion without a teacher model (``fuse_bm25`` alone) fuses BM25 with the
    model that mined, loaded from its files (not the copy being trained)."""
    source = None
    if settings.fuse_bm25 is not None and not settings.teacher:
        source = build_source(settings.retriever, bm25_backend=settings.bm25_backend, rrf_k=settings.rrf_k,
                              **encode_options)
    scorer = build_rescorer(cross_encoder=settings.cross_encoder, teacher=settings.teacher,
                            cross_encoder_batch_size=settings.cross_encoder_batch_size, fuse_bm25=settings.fuse_bm25,
                            source=source, bm25_backend=settings.bm25_backend, **encode_options)
    if scorer is None:
        raise HardnegError("distill_scope 'batch' needs the teacher the pools were scored with, but they were mined "
                           "without one (mine with --teacher, --cross-encoder or --fuse-bm25)")
    return scorer


def remining_for_pools(pools: list[Pool], corpus: Corpus, settings: MineSettings, output_dir: str | Path, *,
                       source: Dataset | None = None, **options) -> Remining:
    """A :class:`Remining` over the queries of ``pools`` (the training queries, held-out dev queries excluded),
    with the judgements of ``source`` when given, else the pools' positives."""
    return Remining(pools_dataset(pools, corpus, source, split="remine"), settings, output_dir, **options)
