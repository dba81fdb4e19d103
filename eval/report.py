"""Markdown for humans: one evaluation as a table (``report.md``), and tables of several runs."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 4) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_report(record: dict) -> str:
    """The ``report.md`` of one evaluation: the metrics, what they were computed on, and how."""
    options = record.get("options", {})
    rows = [[name, number(value), str(record.get("queries_per_metric", {}).get(name, ""))]
            for name, value in record["metrics"].items()]
    pooled = record.get("auc_pooled")
    lines = [
        f"# {record['retriever']} on {record['dataset']}/{record['split']}",
        "",
        markdown_table(["metric", "value", "queries"], rows),
        f"- queries evaluated: {record['queries']} (every judged query, as BEIR averages trec_eval); of them, "
        f"with no document of grade >= {options.get('relevance_level', 1)} (0 on the binary metrics; nDCG keeps "
        f"graded gains): {record.get('queries_without_relevant', 0)}; a query with nothing retrieved counts 0",
        f"- run depth: {record['depth']}; ties ordered as trec_eval (score, then document id descending)",
        f"- ignore hits whose id equals the query id: {options.get('ignore_identical_ids')} "
        f"({options.get('ignore_identical_ids_reason', '')})",
    ]
    if pooled:
        lines.append(f"- pooled AUC: {pooled['positives']} relevant vs {pooled['negatives']} sampled non-relevant "
                     f"pairs from the {pooled['source']} (seed {options.get('seed')}); plots: roc.png, "
                     "score_histogram.png")
    lines.append(f"- qrels rows dropped for an unknown query: {record.get('skipped_qrels_rows', 0)}; naming a "
                 f"document not in the corpus (kept: relevant but never retrievable, as in BEIR/MTEB): "
                 f"{record.get('unretrievable_qrels_rows', 0)}; identical duplicates read once: "
                 f"{record.get('duplicate_qrels_rows', 0)}")
    for path, checksum in record.get("input_checksums", {}).items():
        lines.append(f"- input `{path}`: `{checksum}`")
    return "\n".join(lines) + "\n"
