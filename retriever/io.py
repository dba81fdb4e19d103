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
import re
import shutil
import socket
import tempfile
import time
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


def last_line(err: BaseException) -> str:
    """The line of a third-party exception that says what went wrong (faiss and safetensors put the C++ frame
    first and the reason last), for a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]


def current_umask() -> int:
    """The process's umask (read by setting it, so set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_HOST = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
_STARTED = time.time()  # this process's staging is newer; an older one with our pid is a dead namesake's


def staging_prefix(name: str) -> str:
    """The name start of a temporary file or folder that becomes ``name``: hidden, and carrying this machine and
    this process, so :func:`remove_stale_staging` can tell the leftovers of a killed run from a live run's (on
    a folder shared between machines, only the machine that wrote an entry judges it)."""
    return f".{name}.h{_HOST}p{os.getpid()}."


_STAGING = re.compile(r"^\.(?P<name>.+)\.h(?P<host>[0-9a-f]{8})p(?P<pid>\d+)\.[A-Za-z0-9_]{8}(\.tmp)?$")


def remove_stale_staging(folder: str | os.PathLike, *, depth: int = 2) -> list[Path]:
    """Delete what killed runs left in ``folder`` (and ``depth - 1`` levels below it): temporary files of
    :func:`atomic_write`, half-built folders of :func:`atomic_directory` (a checkpoint cut off mid-save), written
    on this machine by a process that is gone. A folder moved aside by a swap that was cut off is put back when
    nothing took its place. Called when a command starts writing into a folder; returns what it removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if depth < 1 or not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        match = _STAGING.match(entry.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"]), entry):
            _restore_moved_aside(entry, match["name"])
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif not match and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_staging(entry, depth=depth - 1)
    return removed


def _restore_moved_aside(entry: Path, name: str) -> None:
    """``.X.old.*/previous`` is the complete old ``X`` of a swap interrupted between its two renames."""
    if name.endswith(".old") and (entry / "previous").exists():
        target = entry.parent / name.removesuffix(".old")
        if not target.exists():
            os.replace(entry / "previous", target)


def _alive(pid: int, entry: Path) -> bool:
    if pid == os.getpid():  # ours, unless it is older than this process (a dead process had our pid)
        try:
            return entry.lstat().st_mtime >= _STARTED - 1
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's live process, or no pid we can ask
        return True
    return True


def check_output_folder(path: str | os.PathLike, setting: str = "output") -> Path:
    """Refuse an output folder that cannot be written, before any work: a file in its place or on its path, or
    a folder without write permission. Without this the failure comes at the first write, which for training is
    the final save, after all the work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HardnegError(f"{setting} {path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise HardnegError(f"{setting} {path}: cannot be made, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HardnegError(f"{setting} {path}: {existing} is not writable")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path.name), suffix=".tmp", dir=path.parent)
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
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(path.name), dir=path.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the folder gets what mkdir() would give
    try:
        yield staging
        _give_umask(staging)
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=staging_prefix(f"{path.name}.old"), dir=path.parent))
            os.replace(path, aside / "previous")
            try:
                os.replace(staging, path)
            except BaseException:  # cut off between the two renames: the old folder goes back
                if not path.exists():
                    os.replace(aside / "previous", path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _give_umask(folder: Path) -> None:
    """Give everything under ``folder`` the mode ``open()``/``mkdir()`` would give under the user's umask: writers
    such as transformers' ``save_pretrained`` (through safetensors) create their files 0600 in a temporary place."""
    umask = current_umask()
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            file = os.path.join(root, name)
            executable = os.stat(file).st_mode & 0o111
            os.chmod(file, (0o777 if executable else 0o666) & ~umask)


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
