"""BEIR datasets by name: download the official zip once into a cache, verify its md5, unzip.

Nothing downloads unless asked: ``--data beir:scifact`` (or ``download_beir("scifact")``) asks; a
plain ``--data scifact`` only looks in the cache. Offline, the error says where to put a copy.

The md5s are the ones BEIR publishes next to each zip (its README's dataset table). A zip whose md5
differs is deleted and reported, never unzipped. Unzipping goes to a temporary folder in the cache
and is renamed into place, so an interrupted download or unzip leaves no half dataset behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from retriever.io import DataError, HardnegError, current_umask, staging_prefix

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
"""BEIR's published md5 of each ``{name}.zip``."""

BEIR_PREFIX = "beir:"


def cache_dir() -> Path:
    """``$HARDNEG_CACHE/beir``, else ``$XDG_CACHE_HOME/hardneg/beir``, else ``~/.cache/hardneg/beir``."""
    if os.environ.get("HARDNEG_CACHE"):
        return Path(os.environ["HARDNEG_CACHE"]) / "beir"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hardneg" / "beir"


def _is_dataset(folder: Path) -> bool:
    """A BEIR folder (``qrels/`` inside), or a bundle of them such as cqadupstack (``android/qrels/``, ...)."""
    return (folder / "qrels").is_dir() or (folder.is_dir() and any((sub / "qrels").is_dir()
                                                                   for sub in folder.iterdir()))


def cached_folder(name: str, cache: str | os.PathLike | None = None) -> Path | None:
    """The unzipped dataset in the cache, if it is there."""
    folder = Path(cache or cache_dir()) / name
    return folder if _is_dataset(folder) else None


def resolve_beir(spec: str, cache: str | os.PathLike | None = None, *, show_progress: bool = True) -> Path:
    """``NAME`` or ``NAME/SUB`` (cqadupstack's forums: ``cqadupstack/android``) -> the dataset folder."""
    name, _, sub = spec.partition("/")
    folder = download_beir(name, cache, show_progress=show_progress)
    if not sub:
        if not (folder / "qrels").is_dir():
            subs = sorted(p.name for p in folder.iterdir() if (p / "qrels").is_dir())
            raise DataError(folder, f"{name} holds several datasets", hint=f"name one: {BEIR_PREFIX}{name}/{subs[0]} "
                                                                           f"(all: {', '.join(subs)})")
        return folder
    if not (folder / sub / "qrels").is_dir():
        subs = sorted(p.name for p in folder.iterdir() if (p / "qrels").is_dir())
        raise DataError(folder / sub, "not in the downloaded dataset", hint=f"choose one of {', '.join(subs)}")
    return folder / sub


def offline_hint(name: str, cache: Path) -> str:
    return (f"to work offline, download {BEIR_URL.format(name=name)} elsewhere, unzip it and pass the folder "
            f"(--data path/to/{name}), or unzip it into {cache}")


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_beir(name: str, cache: str | os.PathLike | None = None, *, url: str | None = None,
                  md5: str | None = None, show_progress: bool = True) -> Path:
    """The folder of BEIR dataset ``name``, downloaded and checked on first use.

    ``url`` and ``md5`` override the official location and checksum (a mirror, or a dataset BEIR's
    table does not list; without a known md5 the download is refused unless ``md5`` is given).
    """
    cache = Path(cache or cache_dir())
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise HardnegError(f"'{name}' is not a BEIR dataset name")
    found = cached_folder(name, cache)
    if found is not None:
        return found
    expected = (md5 or BEIR_MD5.get(name, "")).lower()
    if not expected:
        raise HardnegError(f"unknown BEIR dataset '{name}' (no published md5); known: {', '.join(sorted(BEIR_MD5))}. "
                           "Give a folder instead, or the md5 to check a download against")
    source = url or BEIR_URL.format(name=name)
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{name}.zip"
    if not archive.is_file():
        _fetch(source, archive, name, cache, show_progress)
    actual = md5_of(archive)
    if actual != expected:
        archive.unlink()
        raise DataError(archive, f"md5 {actual} differs from the published {expected}; the file was deleted",
                        hint=f"the download from {source} is corrupt or is not BEIR's {name}; retry, or "
                             + offline_hint(name, cache))
    if (cache / name).exists():
        raise DataError(cache / name, "exists but holds no qrels/ folder", hint="remove it and retry")
    _extract(archive, cache / name)
    archive.unlink()
    return cache / name


def _fetch(url: str, target: Path, name: str, cache: Path, show_progress: bool) -> None:
    partial = target.with_suffix(".zip.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                      disable=not show_progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    bar.update(len(block))
        os.replace(partial, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        reason = getattr(err, "reason", err)
        raise HardnegError(f"cannot download {url} ({reason}); {offline_hint(name, cache)}") from None


def _extract(archive: Path, destination: Path) -> None:
    """Unzip into ``destination`` (the zip's single top folder, or its files, become the dataset folder)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            staging = Path(tempfile.mkdtemp(prefix=staging_prefix(destination.name), dir=destination.parent))
            staging.chmod(0o777 & ~current_umask())
            try:
                for member in bundle.namelist():
                    target = (staging / member).resolve()
                    if not str(target).startswith(str(staging.resolve()) + os.sep) and target != staging.resolve():
                        raise DataError(archive, f"member {member!r} would be written outside the cache")
                bundle.extractall(staging)
                entries = [p for p in staging.iterdir() if not p.name.startswith("__MACOSX")]
                top = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
                if not _is_dataset(top):
                    raise DataError(archive, "no qrels/ folder inside: not a BEIR dataset zip")
                os.replace(top, destination)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise DataError(archive, f"not a valid zip ({err})") from None
