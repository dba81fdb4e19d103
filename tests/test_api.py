"""The public API: ``import hardneg`` gives every advertised name without importing torch up front, ``python -m
hardneg`` is the CLI, and the README's Python section runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_model_card import UPLOADED_FILES

import hardneg

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_the_object_of_its_home_module():
    from mining.filters import TopKPercPos
    from retriever.train import train

    missing = [name for name in hardneg.__all__ if getattr(hardneg, name, None) is None]
    assert not missing
    assert hardneg.TopKPercPos is TopKPercPos and hardneg.train is train
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", hardneg.__version__)
    with pytest.raises(AttributeError, match="no attribute 'minee'"):
        hardneg.minee  # noqa: B018


def test_python_m_hardneg_is_the_cli_and_importing_it_loads_no_torch():
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import sys, hardneg, hardneg.cli; hardneg.cli.build_parser(); "
                            "print('torch' in sys.modules or 'faiss' in sys.modules)"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "hardneg", "train", "--help"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hardneg train")
    bad = subprocess.run([sys.executable, "-m", "hardneg", "evaluate", "--data", str(ROOT / "no-such-folder")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("hardneg: error:") and "Traceback" not in bad.stderr


def _readme_python_section() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every block in order, in one namespace, as a reader pastes them (the real all-MiniLM-L6-v2 on the demo)."""
    blocks = _readme_python_section()
    assert len(blocks) >= 4 and blocks[0].startswith("import hardneg\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert re.search(r"^\d+ steps; \{'nDCG@10': 0\.\d+", out, flags=re.M), out
    assert re.search(r"^\d+ of 400 queries have hard negatives$", out, flags=re.M), out
    assert re.search(r"^loss \d+\.\d{3}$", out, flags=re.M), out
    assert (tmp_path / "runs" / "train" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "train" / "model").iterdir()) == UPLOADED_FILES
    assert (tmp_path / "runs" / "overlap" / "metrics.json").is_file()


def test_datasets_corpora_pools_and_results_print_short(demo_train, capfd):
    from mining.filters import TopK
    from mining.mine import mine

    assert repr(demo_train) == "Dataset(nfcorpus-demo/train: 400 queries, 3,934 judgements, 2,000 documents)"
    assert repr(demo_train.corpus).startswith("Corpus(2,000 documents")
    capfd.readouterr()
    result = mine(demo_train, "bm25", depth=20, num_negatives=2, filter=TopK(), show_progress=False)
    assert capfd.readouterr().err == ""  # show_progress=False reaches the source a name builds (the bm25 bar)
    assert len(repr(result)) < 200 and repr(result).startswith(f"MiningResult({len(result.pools)} pools")
    assert repr(result.pools[0]).startswith(f"Pool({result.pools[0].query_id!r}: ")


def test_resolve_model_gives_the_folder_sentence_transformers_loads_offline():
    from sentence_transformers import SentenceTransformer

    import hardneg

    folder = hardneg.resolve_model("all-MiniLM-L6-v2")
    assert Path(folder).is_dir()
    assert SentenceTransformer(folder, device="cpu").encode(["a query"]).shape == (1, 384)
