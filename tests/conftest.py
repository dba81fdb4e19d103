"""Shared fixtures: a tiny random-weight BERT with a WordPiece tokenizer trained on the demo corpus.

Everything is built here, offline, in about a second; no test touches the Hugging Face hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Embedding caches of the tests stay out of the user's ~/.cache (read before retriever.dense is imported).
os.environ["HARDNEG_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="hardneg-test-cache-")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from retriever.data import Corpus, Dataset, load_beir  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu`` tests run where torch sees a CUDA GPU and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Crash(Exception):
    """A kill in the middle of training, raised by :func:`crash_after`."""


def crash_after(step_to_crash: int):
    """An ``on_step`` hook of ``train`` that kills the run after that step (its checkpoint, if due, is written)."""
    def hook(step: int, model) -> None:
        if step == step_to_crash:
            raise Crash(f"killed after step {step}")
    return hook


def build_tiny_bert(folder: Path, texts: list[str], seed: int = 0, **dimensions: int) -> Path:
    """A random BERT (hidden size 32, 2 layers unless ``dimensions`` say otherwise: BertConfig keywords) with a
    WordPiece tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=dimensions.get("max_position_embeddings", 128))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), **({"hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
                        | dimensions))
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def small(dataset: Dataset, queries: int = 60, documents: int | None = None) -> Dataset:
    """The first ``queries`` queries; with ``documents``, the corpus cut to their judged documents plus the
    first ``documents`` others, so tests that encode the corpus with a model take seconds."""
    keep = sorted(dataset.qrels)[:queries]
    data = replace(dataset, qrels={q: dataset.qrels[q] for q in keep}, queries={q: dataset.queries[q] for q in keep})
    if documents is None:
        return data
    corpus = dataset.corpus
    wanted = {d for q in keep for d in dataset.qrels[q]} | set(corpus.ids[:documents])
    rows = [i for i, doc_id in enumerate(corpus.ids) if doc_id in wanted]
    return replace(data, corpus=Corpus([corpus.ids[i] for i in rows], [corpus.titles[i] for i in rows],
                                       [corpus.bodies[i] for i in rows]))


@pytest.fixture(scope="session")
def demo_train() -> Dataset:
    return load_beir("nfcorpus-demo", "train")


@pytest.fixture(scope="session")
def demo_test() -> Dataset:
    return load_beir("nfcorpus-demo", "test")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, demo_train) -> Path:
    """A HF model folder (no sentence-transformers files): random BERT, hidden size 32, 2 layers."""
    texts = demo_train.corpus.texts()[:1000] + list(demo_train.queries.values())
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, demo_train) -> Path:
    """A random-weight BERT with a one-logit classification head, in the sentence-transformers CrossEncoder
    folder layout (a HF sequence-classification model). Its scores vary little (random pooler), so tests filter
    with the scale-free TopK-MarginPos at margin 0."""
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    build_tiny_bert(folder, demo_train.corpus.texts()[:500] + list(demo_train.queries.values()))
    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=1)
    with torch.no_grad():  # a wide head, so that random scores spread instead of all sitting near sigmoid(0)
        model.classifier.weight.normal_(0.0, 3.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def nfcorpus_folder() -> Path:
    folder = SHARED_DATA / "beir" / "nfcorpus"
    if not folder.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return folder
