"""The evaluation settings, declared once: the ``evaluate`` command's flags and the ``evaluate:`` section of run
and benchmark configs both come from :class:`EvaluateSettings` (see :mod:`retriever.settings`)."""

from __future__ import annotations

from dataclasses import dataclass

from eval.metrics import DEFAULT_METRICS, check_metrics
from retriever.settings import MAX_SEED, check_fields, setting


@dataclass
class EvaluateSettings:
    """How a ranking is scored: which metrics, how deep, what counts as relevant, and the AUC-pooled sample."""

    metrics: list = setting(list(DEFAULT_METRICS), "nDCG@k, Recall@k, P@k, MAP[@k], MRR[@k], AUC (retrieved "
                                                   "list), AUC-corpus (whole corpus, dense or bm25), AUC-pooled "
                                                   "(across queries)")
    depth: int = setting(1000, "documents retrieved per query", ge=1)
    relevance_level: int = setting(1, "lowest grade counted relevant by Recall, P, MAP, MRR, AUC (trec_eval -l)",
                                   ge=1)
    ignore_identical_ids: bool | None = setting(None, "drop a hit whose id equals the query id (default: on for "
                                                      "ArguAna and Quora, as BEIR/MTEB, and where most queries "
                                                      "are unjudged copies of corpus documents)")
    auc_negatives: int = setting(100, "non-relevant documents sampled per query for AUC-pooled", ge=1)
    seed: int = setting(42, "seed of the AUC-pooled sample", ge=0, le=MAX_SEED)

    def check(self) -> None:
        check_fields(self, "evaluate")
        check_metrics(tuple(self.metrics), self.depth)

    def options(self) -> dict:
        """The keyword arguments of :func:`eval.evaluate.evaluate` these settings stand for."""
        return {"metrics": tuple(self.metrics), "depth": self.depth, "relevance_level": self.relevance_level,
                "ignore_identical_ids": self.ignore_identical_ids, "auc_negatives": self.auc_negatives,
                "seed": self.seed}
