"""The model card: the ``README.md`` a trained model folder carries, as sentence-transformers writes one.

Why: a model folder is what people share (``huggingface-cli upload``, a team's storage). Without a card nobody
can tell what it was trained from, on which data, with which negatives and loss, or how good it is; with the
peers the user has to write it. Here it is rendered from the run's own record (``training_config.json``:
config, summary, mining record, checksums, library versions), so it cannot disagree with what happened, and
re-rendered by ``hardneg run`` once the trained model is evaluated (the metrics before and after).

The YAML header uses the Hugging Face hub's model-card keys (``library_name``, ``pipeline_tag``, ``tags``,
``base_model``), so the hub lists the model as a sentence-transformers model.
"""

from __future__ import annotations

import os
from pathlib import Path

from retriever.io import atomic_write

CARD_FILE = "README.md"
_ALWAYS_SHOWN = ("epochs", "batch_size", "learning_rate", "seed")
_DISTILLATION_KEYS = ("distill_form", "teacher_temperature")  # shown only when the run distils
_ANCHORS = {"min": "lowest-scored", "max": "highest-scored", "mean": "mean"}
_TRAINING_KEYS = ("loss", "temperature", "learnable_temperature", "distill_weight", "distill_form",
                  "teacher_temperature", "mw_weight", "epochs", "max_steps", "batch_size", "learning_rate",
                  "warmup_ratio", "weight_decay", "positives_per_query", "negatives_per_query", "random_negatives",
                  "remine_every", "dev_fraction", "dev_corpus_size", "patience", "soup", "precision", "cache_chunk",
                  "seed")


def write_model_card(folder: str | os.PathLike, record: dict, evaluation: dict | None = None) -> Path:
    """Write ``folder/README.md`` from a training record; ``evaluation`` maps ``"before"``/``"after"`` to
    ``{dataset/split label: {metric: value}}`` (either may be missing). Returns the card's path."""
    path = Path(folder) / CARD_FILE
    with atomic_write(path) as handle:
        handle.write(render_model_card(record, evaluation))
    return path


def render_model_card(record: dict, evaluation: dict | None = None) -> str:
    """The card's Markdown text (see :func:`write_model_card`)."""
    config, summary = record.get("config") or {}, record.get("summary") or {}
    identity = record.get("model_identity") or {}
    base = str(config.get("model") or identity.get("name") or "unknown")
    mining = record.get("mining") or {}
    datasets = sorted({str(m["dataset"]) for m in _mining_records(mining) if m.get("dataset")})
    header = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
              "tags:", *(f"- {tag}" for tag in ("sentence-transformers", "sentence-similarity", "feature-extraction",
                                               "dense-retrieval", "hardneg"))]
    if _is_hub_id(base):
        header.append(f"base_model: {base}")
    if datasets:
        header += ["datasets:", *(f"- {name}" for name in datasets)]
    header.append("---")
    title = base if _is_hub_id(base) else Path(base).name
    lines = [*header, "", f"# {title} fine-tuned with hardneg", "",
             f"A dense retriever trained from `{base}` with hardneg on mined hard negatives "
             f"({config.get('loss', '?')} loss). It loads in sentence-transformers as any model does.", ""]
    lines += _usage(identity)
    lines += ["## Model", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in (
        ("base model", f"`{base}`"), ("architecture", identity.get("model_type")),
        ("layers", identity.get("layers")), ("dimension", identity.get("hidden_size")),
        ("pooling", identity.get("pooling")), ("normalized", identity.get("normalize")),
        ("max length (tokens)", identity.get("max_length")),
        ("query prefix", _code(identity.get("query_prefix"))),
        ("document prefix", _code(identity.get("document_prefix")))) if value not in (None, "")]
    lines += ["", "## Training data", ""]
    lines += _training_data(mining, record.get("input_checksums") or {})
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    distills = config.get("loss") == "kd" or bool(config.get("distill_weight"))
    lines += [f"| {key} | {config[key]} |" for key in _TRAINING_KEYS
              if (config.get(key) not in (None, 0, 0.0, False) or key in _ALWAYS_SHOWN)
              and (distills or key not in _DISTILLATION_KEYS)]
    lines += ["", _summary_sentence(summary, config)]
    lines += _evaluation(evaluation or {})
    versions = record.get("library_versions") or {}
    if versions:
        lines += ["", "## Framework versions", ""]
        lines += [f"- {name}: {version}" for name, version in sorted(versions.items())]
    return "\n".join(lines) + "\n"


def _usage(identity: dict) -> list[str]:
    query = identity.get("query_prefix")
    encode_queries = ('model.encode(["what causes night sweats?"], prompt_name="query")' if query
                      else 'model.encode(["what causes night sweats?"])')
    encode_documents = ('model.encode(["Night sweats can be caused by ..."], prompt_name="document")'
                        if identity.get("document_prefix") else 'model.encode(["Night sweats can be caused by ..."])')
    return ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
            'model = SentenceTransformer("path/to/this/folder")  # or its hub id once uploaded',
            f"queries = {encode_queries}", f"documents = {encode_documents}",
            "scores = model.similarity(queries, documents)", "```", "",
            "Or, with hardneg: `hardneg evaluate --retriever path/to/this/folder --data BEIR_FOLDER`.", ""]


def _mining_records(mining: dict | list) -> list[dict]:
    return mining if isinstance(mining, list) else [mining] if mining else []


def _training_data(mining: dict | list, checksums: dict) -> list[str]:
    lines = []
    for record in _mining_records(mining):
        settings, counts = record.get("settings") or {}, record.get("counts") or {}
        flt = settings.get("filter") or {}
        flt_text = flt.get("name", "none") + "".join(f", {k} {v}" for k, v in flt.items() if k != "name")
        lines += [f"- **{record.get('dataset', 'dataset')}** ({record.get('split', 'train')} split): "
                  f"{counts.get('queries', '?')} queries; candidates from `{settings.get('retriever', '?')}` "
                  f"(depth {settings.get('depth', '?')})"
                  + (f", rescored by `{settings['rescorer']}`" if settings.get("rescorer") else "")
                  + f"; false negatives removed by {flt_text} against the "
                  f"{_ANCHORS.get(settings.get('anchor'), settings.get('anchor', '?'))} positive"
                  + (f" (fallback: {settings['anchor_fallback']})" if settings.get("anchor_fallback") else "")
                  + f"; up to {settings.get('num_negatives', '?')} negatives per query, sampled "
                  f"{settings.get('sampling', '?')}; {counts.get('queries_with_hard_negatives', '?')} queries with "
                  "hard negatives."]
    if not lines:
        lines.append("- pools not written by `hardneg mine` (no mining record)")
    if checksums:
        lines += ["", "Input files (sha256):", ""]
        lines += [f"- `{Path(name).name}`: `{checksum}`" for name, checksum in sorted(checksums.items())]
    return lines


def _summary_sentence(summary: dict, config: dict) -> str:
    text = (f"Trained {summary.get('steps', '?')} steps ({summary.get('epochs_run', '?')} epochs, "
            f"{summary.get('queries_per_epoch', '?')} queries per epoch) in {summary.get('precision', '?')}; "
            f"loss {summary.get('first_loss')} -> {summary.get('final_loss')}.")
    if summary.get("best_step") is not None:
        text += (f" This folder holds the model of step {summary['best_step']}, the best "
                 f"{summary.get('dev_metric', 'dev score')} on held-out queries ({summary['best_dev']:.4f})"
                 + (", chosen on queries held out of training" if config.get("dev_fraction") else "") + ".")
    if summary.get("datasets"):
        text += (" Trained on " + ", ".join(f"{name} ({count} queries)" for name, count in summary["datasets"].items())
                 + ", each batch drawn from one dataset.")
    if summary.get("remine_rounds"):
        text += f" Negatives re-mined with the model in {len(summary['remine_rounds'])} rounds."
    return text


def _evaluation(evaluation: dict) -> list[str]:
    after, before = evaluation.get("after") or {}, evaluation.get("before") or {}
    if not after:
        return []
    lines = ["", "## Evaluation", "", "trec_eval-exact metrics computed by hardneg"
             + (" (before: the base model)" if before else "") + ".", ""]
    for label, metrics in after.items():
        names = list(metrics)
        lines += [f"**{label}**", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        if label in before:
            lines.append("| base model | " + " | ".join(f"{before[label][n]:.4f}" for n in names) + " |")
        lines += ["| this model | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |", ""]
    return lines


def _is_hub_id(name: str) -> bool:
    """A hub model id (``org/name`` or a bare name), not a local path."""
    return not (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep + os.sep in name)


def _code(value: object) -> str | None:
    return f"`{value}`" if value else None
