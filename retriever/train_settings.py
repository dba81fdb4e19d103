"""The training settings (:class:`TrainConfig`), declared once for ``hardneg train``, a config's ``train:`` section
and Python; kept apart from :mod:`retriever.train` so the CLI builds its flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, fields

from retriever.encoding import PRECISIONS
from retriever.io import HardnegError
from retriever.reporting import REPORT_TARGETS
from retriever.settings import MAX_SEED, check_fields, setting

LOSSES = ("infonce", "mw", "decoupled", "kd")
DISTILL_FORMS = ("kl", "margin-mse")
DISTILL_SCOPES = ("pools", "batch")
# Without save_steps, a safety-net checkpoint also lands inside an epoch once this long has passed since the last
# checkpoint: a killed run then loses at most half an hour, however long its epochs (a CPU epoch can take hours).
SAFETY_NET_SECONDS = 30 * 60


@dataclass
class TrainConfig:
    """Every training setting, declared once: ``hardneg train`` flags, a config's ``train:`` section and Python."""

    model: str = setting("all-MiniLM-L6-v2", "HF or sentence-transformers model name or directory to start from")
    epochs: int = setting(1, "passes over the pools (the most; early stopping may end sooner)", ge=1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps in all (the schedule spans "
                                          "them); unset: epochs x steps per epoch", ge=1)
    batch_size: int = setting(32, "queries per step, all processes together", gt=0, aliases=("--train-batch-size",))
    learning_rate: float = setting(2e-5, "AdamW peak learning rate", gt=0, aliases=("--lr",))
    warmup_ratio: float = setting(0.1, "share of the steps with a linear warm-up", ge=0, lt=1)
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and norms)", ge=0)
    loss: str = setting("infonce", "infonce, mw (Mann-Whitney/AUC), decoupled (decoupled softmax), or kd "
                                   "(distillation from the teacher scores of the pools alone)",
                        choices=LOSSES, argparse_choices=False)
    temperature: float = setting(0.05, "(initial) temperature of the student's scores", gt=0)
    learnable_temperature: bool = setting(False, "train the temperature too")
    symmetric: bool = setting(False, "infonce: add the document->query term")
    mw_pairs: str = setting("query", "mw: pair positives with their query's negatives or with every negative "
                                     "of the batch", choices=("query", "global"), argparse_choices=False)
    mw_weight: float | None = setting(None, "mw: train InfoNCE + this weight x MW instead of MW alone", ge=0)
    distill_weight: float = setting(0.0, "add this weight x the distillation loss (see distill_form) to the "
                                         "contrastive loss; needs pools mined with a teacher or cross-encoder",
                                    ge=0)
    distill_form: str = setting("kl", "distillation: kl (KL divergence of the teacher's and the student's "
                                      "softmax over each query's positives and mined negatives) or margin-mse "
                                      "(MarginMSE of positive-negative score margins)", choices=DISTILL_FORMS,
                                argparse_choices=False)
    teacher_temperature: float | None = setting(None, "temperature of the teacher's scores in the distillation "
                                                      "(default: the student's temperature)", gt=0)
    distill_scope: str = setting("pools", "distillation over each query's sampled positives and mined negatives, "
                                          "as the pools score them (pools), or over every document of the step, "
                                          "which the teacher scores while training (batch: TAS-B's in-batch "
                                          "distillation, many more soft labels for no extra encoding; the teacher "
                                          "is rebuilt from the pools' pools.meta.json)",
                                 choices=DISTILL_SCOPES, argparse_choices=False)
    positives_per_query: int = setting(1, "positives of each query in each step, sampled per epoch", gt=0,
                                       aliases=("--positives-per-step",))
    negatives_per_query: int = setting(1, "mined hard negatives per query per step", ge=0)
    random_negatives: int = setting(0, "random corpus documents added per query per step, drawn anew every "
                                       "epoch (STAR's mix of random and hard negatives)", ge=0)
    remine_every: int | None = setting(None, "re-mine the pools with the model being trained after every E epochs "
                                             "(same sources with the model as dense retriever, same rescorer, "
                                             "filter and sampling; ANCE/STAR dynamic negatives)", ge=1)
    max_length: int | None = setting(None, "token limit for queries and documents (default: the model's)", ge=1)
    pooling: str | None = setting(None, "default: the model's, else mean", choices=("mean", "cls"))
    normalize: bool | None = setting(None, "L2-normalise embeddings (default: the model's, else yes)")
    query_prefix: str | None = setting(None, "text put before every query, e.g. 'query: '", empty=True)
    document_prefix: str | None = setting(None, "text put before every document, e.g. 'passage: '",
                                          empty=True)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    dropout: float | None = setting(None, "dropout probability of every dropout layer of the encoder while "
                                          "training (default: the model's own, 0.1 for BERT models); 0 lets a CPU "
                                          "use its fused attention kernel (faster steps, BENCHMARKS.md)", ge=0, lt=1)
    cache_chunk: int | None = setting(None, "gradient cache: encode this many texts per pass (same gradients, "
                                            "memory of one chunk)", gt=0)
    precision: str = setting("auto", "training autocast: auto (bf16 where the hardware runs it natively, else "
                                     "fp32), fp32, bf16, fp16 (CUDA only, with a loss scaler)",
                             choices=PRECISIONS, argparse_choices=False)
    save_steps: int | None = setting(None, "write a checkpoint every N steps (and at the end); unset: one at the "
                                           "end of each epoch but the last and every "
                                           f"{SAFETY_NET_SECONDS // 60} minutes inside one, each replacing the one "
                                           "before and removed when the run finishes, so that a killed run loses "
                                           "at most that much",
                                     gt=0)
    save_total_limit: int | None = setting(None, "keep only the last N checkpoints", gt=0)
    eval_steps: int | None = setting(None, "score the dev queries every N steps and at the end (default, when "
                                           "there are dev queries: at the end of every epoch); the best model "
                                           "is what OUTPUT/model holds", gt=0)
    dev_fraction: float | None = setting(None, "hold out this share of the training queries (seeded, by query) "
                                               "as the dev set for keep-best and early stopping, for data with "
                                               "no dev split", gt=0, le=0.5)
    dev_corpus_size: int | None = setting(None, "score dev over this many documents (per dataset) instead of the "
                                                "whole corpus: every judged document of the dev queries, then with "
                                                "dev_fraction their mined negatives, then seeded random ones (for "
                                                "corpora too large to re-encode at every evaluation; the scores "
                                                "rank models, not comparable with the whole corpus's)", gt=0)
    patience: int | None = setting(None, "stop after this many dev evaluations without a new best", gt=0)
    soup: int | None = setting(None, "greedy model soup (Wortsman et al.) over the N best dev-evaluated models: "
                                     "each averaged in only if dev rises; kept only if it beats the best one",
                               ge=2)
    report_to: str = setting("none", "where step metrics go besides OUTPUT/logs/train_log.jsonl: none, or "
                                     "tensorboard (OUTPUT/logs/tensorboard; the `tensorboard` extra)",
                             choices=REPORT_TARGETS)
    seed: int = setting(42, "seed of the data order, sampling and initialisation", ge=0, le=MAX_SEED)

    def check(self) -> None:
        """Refuse settings that cannot train, before the model is loaded."""
        check_fields(self, "train")
        if self.cache_chunk is not None and self.cache_chunk > self.batch_size:
            raise HardnegError(f"train: cache_chunk {self.cache_chunk} is larger than the batch size "
                               f"{self.batch_size}; a chunk splits a batch, so it must be <= batch_size "
                               "(or unset for no gradient cache)")
        if self.mw_weight is not None and self.loss != "mw":
            raise HardnegError("train: mw_weight (InfoNCE + mw_weight x MW) needs loss 'mw' and a value >= 0, "
                               f"got loss {self.loss!r}, mw_weight {self.mw_weight!r}")
        if self.symmetric and not (self.loss == "infonce" or (self.loss == "mw" and self.mw_weight is not None)):
            raise HardnegError(f"train: symmetric applies to an InfoNCE term; loss {self.loss!r} has none "
                               "(use infonce, or mw with mw_weight to mix in InfoNCE)")
        if self.remine_every is not None and self.remine_every >= self.epochs:
            raise HardnegError(f"train: remine_every {self.remine_every} re-mines after every {self.remine_every} "
                               f"epoch(s), but training runs {self.epochs}: it would never re-mine; raise epochs "
                               "or drop remine_every")
        if self.distill_scope == "batch" and not self.distills:
            raise HardnegError("train: distill_scope 'batch' scores the batch with the teacher for a distillation "
                               "term, but nothing distils: set distill_weight > 0 or loss 'kd'")
        if not self.distills:
            defaults = {field.name: field.default for field in fields(self)}
            changed = [name for name in ("teacher_temperature", "distill_form")
                       if getattr(self, name) != defaults[name]]
            if changed:
                raise HardnegError(f"train: {', '.join(f'{name} {getattr(self, name)!r}' for name in changed)} "
                                   f"only shape{'s' if len(changed) == 1 else ''} the distillation term, but nothing "
                                   "distils: set distill_weight > 0 "
                                   "or loss 'kd', or leave "
                                   + " and ".join(f"{name} at its default ({defaults[name]!r})" for name in changed))
        if self.distills and self.distill_scope == "pools":
            if self.distill_form == "margin-mse" and self.negatives_per_query == 0:
                raise HardnegError("train: distill_form 'margin-mse' distils positive-negative margins, but "
                                   "negatives_per_query is 0, so no query has a pair and the term is always 0: "
                                   "raise negatives_per_query, or use distill_scope 'batch'")
            if self.distill_form == "kl" and self.positives_per_query + self.negatives_per_query < 2:
                raise HardnegError(f"train: distill_form 'kl' compares the teacher's and the student's softmax over "
                                   f"each query's scored documents, but {self.positives_per_query} positive(s) + "
                                   f"{self.negatives_per_query} negative(s) per query is one document, so the term "
                                   "is always 0: raise negatives_per_query, or use distill_scope 'batch'")
        if self.dev_corpus_size is not None and not self.scores_on_dev:
            raise HardnegError(f"train: dev_corpus_size {self.dev_corpus_size} sizes the corpus dev is scored on, "
                               "but nothing scores on dev: set dev_fraction (or eval_steps, patience or soup with a "
                               "dev split), or drop dev_corpus_size")
        if self.loss == "kd" and self.distill_weight:
            raise HardnegError("train: loss 'kd' is the distillation alone; distill_weight adds it to a "
                               "contrastive loss (infonce, mw, decoupled): give one or the other")

    @property
    def scores_on_dev(self) -> bool:
        """Whether training evaluates on dev queries (which ``dev_fraction`` holds out, or a dev split provides)."""
        return bool(self.eval_steps or self.patience or self.soup or self.dev_fraction)

    @property
    def distills(self) -> bool:
        """Whether training reads the teacher scores of the pools."""
        return self.loss == "kd" or self.distill_weight > 0
