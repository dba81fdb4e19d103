"""BEIR by name: download over HTTP from a local server, md5 check, unzip into the cache, offline errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from retriever import download
from retriever.data import BUNDLED_DIR, dataset_folder, load_beir
from retriever.download import BEIR_MD5, download_beir, resolve_beir
from retriever.io import DataError, HardnegError


def make_zip(folder: Path, name: str) -> tuple[Path, str]:
    """A BEIR-style zip (top folder ``name/``) of the bundled demo data, and its md5."""
    archive = folder / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((BUNDLED_DIR / "nfcorpus-demo").rglob("*")):
            if path.is_file():
                bundle.write(path, f"{name}/{path.relative_to(BUNDLED_DIR / 'nfcorpus-demo')}")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on localhost serving tmp_path/www; yields its base URL and the request log."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    httpd.shutdown()
    httpd.server_close()


def test_download_verify_extract_and_cache(server, tmp_path):
    base, root, requests = server
    _, md5 = make_zip(root, "mini")
    cache = tmp_path / "cache"
    folder = download_beir("mini", cache, url=f"{base}/mini.zip", md5=md5, show_progress=False)
    assert folder == cache / "mini" and (folder / "qrels" / "test.tsv").is_file()
    assert not (cache / "mini.zip").exists() and not list(cache.glob(".mini.*"))  # no leftovers
    dataset = load_beir(folder, "test")
    assert dataset.name == "mini" and len(dataset.queries) == 80
    # second time: from the cache, no request
    count = len(requests)
    assert download_beir("mini", cache, url=f"{base}/mini.zip", md5=md5) == folder
    assert len(requests) == count


def test_checksum_mismatch_deletes_and_extracts_nothing(server, tmp_path):
    base, root, _ = server
    make_zip(root, "mini")
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        download_beir("mini", cache, url=f"{base}/mini.zip", md5="0" * 32, show_progress=False)
    message = str(info.value)
    assert "mini.zip" in message and "differs from the published " + "0" * 32 in message
    assert "offline" in message
    assert not (cache / "mini").exists() and not (cache / "mini.zip").exists()


def test_unreachable_server_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "BEIR_URL", "http://127.0.0.1:9/{name}.zip")  # discard port: refused
    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HardnegError) as info:
        dataset_folder("beir:scifact", show_progress=False)
    message = str(info.value)
    assert "cannot download http://127.0.0.1:9/scifact.zip" in message
    assert "--data path/to/scifact" in message and str(tmp_path / "cache" / "beir") in message
    assert not list((tmp_path / "cache" / "beir").glob("scifact*"))


def test_bare_name_uses_the_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        dataset_folder("scifact")
    assert "beir:scifact downloads" in str(info.value)
    shutil.copytree(BUNDLED_DIR / "nfcorpus-demo", tmp_path / "cache" / "beir" / "scifact")
    assert dataset_folder("scifact") == tmp_path / "cache" / "beir" / "scifact"


def test_unknown_name_without_md5_is_refused(tmp_path):
    with pytest.raises(HardnegError, match="unknown BEIR dataset 'not-beir'"):
        download_beir("not-beir", tmp_path)
    with pytest.raises(HardnegError, match="not a BEIR dataset name"):
        download_beir("../etc", tmp_path)


def test_zip_without_qrels_or_escaping_paths(server, tmp_path):
    base, root, _ = server
    with zipfile.ZipFile(root / "bad.zip", "w") as bundle:
        bundle.writestr("bad/corpus.jsonl", "{}\n")
    md5 = hashlib.md5((root / "bad.zip").read_bytes()).hexdigest()
    with pytest.raises(DataError, match="no qrels/ folder"):
        download_beir("bad", tmp_path / "c", url=f"{base}/bad.zip", md5=md5, show_progress=False)
    with zipfile.ZipFile(root / "evil.zip", "w") as bundle:
        bundle.writestr("../../evil.txt", "x")
    md5 = hashlib.md5((root / "evil.zip").read_bytes()).hexdigest()
    with pytest.raises(DataError, match="outside the cache"):
        download_beir("evil", tmp_path / "c", url=f"{base}/evil.zip", md5=md5, show_progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_published_md5_table():
    assert BEIR_MD5["nfcorpus"] == "a89dba18a62ef92f7d323ec890a0d38d"  # the md5 of ../shared/data's source zip
    assert {"scifact", "arguana", "fiqa", "quora", "trec-covid", "msmarco"} <= set(BEIR_MD5)
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in BEIR_MD5.values())


def test_bundle_of_datasets_like_cqadupstack(server, tmp_path):
    base, root, _ = server
    archive = root / "cq.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for forum in ("android", "gaming"):
            for path in sorted((BUNDLED_DIR / "nfcorpus-demo").rglob("*")):
                if path.is_file():
                    bundle.write(path, f"cq/{forum}/{path.relative_to(BUNDLED_DIR / 'nfcorpus-demo')}")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    download_beir("cq", cache, url=f"{base}/cq.zip", md5=md5, show_progress=False)
    assert resolve_beir("cq/gaming", cache) == cache / "cq" / "gaming"
    assert load_beir(resolve_beir("cq/android", cache), "test").name == "android"
    with pytest.raises(DataError, match="holds several datasets.*beir:cq/android"):
        resolve_beir("cq", cache)
    with pytest.raises(DataError, match="choose one of android, gaming"):
        resolve_beir("cq/nope", cache)
