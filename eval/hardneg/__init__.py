"""hardneg's public Python API: ``import hardneg`` gives the functions the CLI calls, in the order data flows.

    import hardneg
    train_split = hardneg.load_beir("nfcorpus-demo", "train")
    pools = hardneg.mine(train_split, "bm25", filter=hardneg.TopKPercPos(0.95)).pools
    hardneg.train(pools, train_split.corpus, hardneg.TrainConfig(), "runs/train")
    hardneg.evaluate(hardneg.load_beir("nfcorpus-demo", "test"), "runs/train/model")

The names live in the three packages (``retriever`` ← ``mining`` ← ``eval``); this module only gathers them, and
loads each on first use so that ``python -m hardneg --help`` does not import torch. The source sits in
``eval/hardneg/`` (``pyproject.toml`` maps it to ``hardneg``): the app layer comes after the last stage of the flow
and is the one place that may import all three.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hardneg")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

# public name -> module that defines it, grouped by stage
_EXPORTS = {
    # data
    "Corpus": "retriever.data", "Dataset": "retriever.data", "Pool": "retriever.data", "Candidate": "retriever.data",
    "load_beir": "retriever.data", "load_msmarco": "retriever.data", "load_dataset": "retriever.data",
    "read_pools": "retriever.data", "write_pools": "retriever.data",
    # what a custom model implements, and the built-in models
    "Encoder": "retriever.protocol", "Retriever": "retriever.protocol", "Scorer": "retriever.protocol",
    "DualEncoder": "retriever.encoder", "as_retriever": "retriever.factory", "resolve_model": "retriever.encoder",
    "write_embedding_table": "retriever.embedding_table", "PrecomputedRetriever": "retriever.embedding_table",
    # mining
    "mine": "mining.mine", "MiningResult": "mining.mine", "Remining": "mining.remine",
    "TopK": "mining.filters", "TopKAbs": "mining.filters", "TopKMarginPos": "mining.filters",
    "TopKPercPos": "mining.filters", "TopKShifted": "mining.filters", "RankWindow": "mining.filters",
    "FilterChain": "mining.filters", "make_filter": "mining.filters",
    # training
    "train": "retriever.train", "TrainConfig": "retriever.train_settings",
    "InfoNCELoss": "retriever.losses", "MWLoss": "retriever.losses", "DecoupledSoftmaxLoss": "retriever.losses",
    "CombinedLoss": "retriever.losses", "DistilledLoss": "retriever.losses", "make_loss": "retriever.losses",
    "build_masks": "retriever.losses",
    # evaluation and whole runs
    "evaluate": "eval.evaluate", "evaluate_datasets": "eval.suite", "SuiteResult": "eval.suite",
    "load_config": "hardneg.pipeline", "run_pipeline": "hardneg.pipeline",
    "HardnegError": "retriever.io",
}

# public name -> module exposed whole
_MODULES = {"sources": "mining.sources"}

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> object:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'hardneg' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
