"""How hardneg writes outputs and reports bad input.

Every output goes through :func:`atomic_write`, so a crash leaves the previous file or none, never
half a file. Every input problem is raised as a :class:`DataError` that names the file, the line and
the field, because "KeyError: '_id'" three stages later is what users of the peers get today.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any


class HardnegError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits with status 2."""


class DataError(HardnegError):
    """Bad input, located precisely: ``file:line: field 'x': problem (what to do)``."""

    def __init__(self, path: str | os.PathLike, message: str, *, line: int | None = None,
                 field: str | None = None, hint: str | None = None) -> None:
        self.path, self.line, self.field = str(path), line, field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}" + (f" ({hint})" if hint else ""))


def current_umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the output gets what open() would give
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` outside pyplot, so plotting never switches the global backend (a notebook's
    inline one included) and needs no display; :func:`save_figure` writes it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(figure, path: str | os.PathLike, **options) -> Path:
    """``figure`` as a PNG at ``path``, written atomically (``options`` go to ``savefig``: dpi, bbox_inches)."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", **options)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a staging directory beside ``path`` and swap it into place only on success.

    A model, a checkpoint or a saved dataset is many files; writing them in place would leave a mix of
    old and new files after a crash. An existing folder is moved aside before the swap and removed
    after it, so at every moment ``path`` is either the old folder or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the folder gets what mkdir() would give
    try:
        yield staging
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, aside / "previous")
            os.replace(staging, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable bytes for the same content)."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, recorded next to outputs so a run can be tied to its inputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


_TRACKED_LIBRARIES = ("hardneg", "torch", "transformers", "sentence-transformers", "faiss-cpu",
                      "faiss-gpu", "bm25s", "rank-bm25", "numpy", "pytrec-eval-terrier")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide hardneg's numbers, for the provenance record."""
    versions = {}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
