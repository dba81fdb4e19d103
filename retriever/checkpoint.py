"""Training checkpoints: everything a run needs to continue exactly as if it had never stopped.

A checkpoint is a folder ``<output>/checkpoints/step-<N>/`` holding the model (a normal model folder,
loadable on its own), ``trainer_state.pt`` (optimizer, scheduler, grad scaler, learnable temperature,
the RNG states of every process, data position, best dev score, the log so far) and ``state.json``
(the same facts a person wants to read: step, epoch, config, model identity). The folder is assembled
under a hidden temporary name and renamed into place, so a crash while saving leaves the previous
checkpoints intact and never a half-written one that ``--resume latest`` would pick.

Why so much state: the peers restore model and optimizer but not the data position or the dropout
RNG, so a resumed run drifts from the uninterrupted one. Here the data order is a pure function of
(pools, seed, epoch) and the RNG states are restored, so on CPU the final weights are bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever.io import HardnegError, atomic_directory

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
STATE_JSON = "state.json"
SAFETY_NET = "safety_net"  # state.json key: a checkpoint written without save_steps (epoch end, or half-hourly)
MODEL_DIR = "model"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What a scheduler sends before it kills a job (SLURM at preemption or the time limit, Kubernetes, a plain
# `kill`; torchrun passes it on to every worker): a grace period follows, which one step fits.
STOP_SIGNALS = (signal.SIGTERM,)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU and CUDA generator states (storable with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                      float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """A stop signal noted instead of obeyed at once, so that training writes a checkpoint at the end of the step it
    is in and then ends as the signal asked (the same exit status the scheduler expects, and nothing lost).

    Without it a run killed between checkpoints loses everything since the last one (up to half an hour without
    ``save_steps``). Only the main thread can take signals; elsewhere (training started from a thread) this does
    nothing and the signal keeps its usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:  # a signal the caller ignores stays ignored
                    self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        """The handlers as they were before (None: one not set from Python, i.e. the default)."""
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _note(self, number: int, frame: object) -> None:
        self.received = number

    def obey(self, number: int | None = None) -> None:
        """Restore the handlers and deliver signal ``number`` (default: the one noted, if any) to this process:
        it now ends as it was asked to, or the handler from before this one runs. Under torchrun every rank
        obeys rank 0's signal, received or not."""
        self.__exit__()
        number = number or self.received
        if number:
            os.kill(os.getpid(), number)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first (hidden staging folders are not checkpoints)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike, resume: str | os.PathLike, flag: str = "--resume") -> Path:
    """The checkpoint folder meant by ``--resume``: ``latest`` (in ``output_dir``) or a path.

    A path may be a checkpoint folder or a run's output folder (its latest checkpoint is taken). ``flag``: the
    setting the errors name (``train.resume`` in a config).
    """
    if str(resume) == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise HardnegError(f"{flag} latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} (did the "
                               "run reach its first checkpoint: the end of its first epoch, half an hour, or "
                               "its first --save-steps?)")
        return found[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if checkpoint_dirs(path):
        return checkpoint_dirs(path)[-1]
    raise HardnegError(f"{flag} {resume}: not a checkpoint folder (no {STATE_FILE}) nor a run folder with "
                       f"{CHECKPOINTS_DIR}/step-NNNNNNN")


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, state: dict[str, Any],
                    summary: dict[str, Any], keep: int | None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, then drop the oldest beyond ``keep`` (None keeps all).

    ``model`` is saved with its own ``save`` (a loadable model folder); ``state`` goes to
    ``trainer_state.pt``; ``summary`` (JSON-able) to ``state.json``.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_directory(final) as staging:  # re-saving a step after a resume swaps, never deletes first
        model.save(staging / MODEL_DIR)
        with open(staging / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        (staging / STATE_JSON).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if keep is not None:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_safety_nets(output_dir: str | os.PathLike, keep: int | None = None) -> None:
    """Delete the safety-net checkpoints a run without ``save_steps`` writes (``SAFETY_NET`` in their
    ``state.json``), but the one of step ``keep``, and the checkpoints folder once empty. The checkpoints of
    ``save_steps`` (a resumed run may have had them) are the user's and stay."""
    spared = f"step-{keep:07d}" if keep is not None else None
    for folder in checkpoint_dirs(output_dir):
        if folder.name != spared and _is_safety_net(folder):
            shutil.rmtree(folder)
    with contextlib.suppress(OSError):
        (Path(output_dir) / CHECKPOINTS_DIR).rmdir()


def _is_safety_net(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / STATE_JSON).read_text(encoding="utf-8")).get(SAFETY_NET))
    except (OSError, ValueError):
        return False


def load_checkpoint_state(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, state.json)`` of a checkpoint folder."""
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise HardnegError(f"{checkpoint}: cannot read the checkpoint ({err})") from None
    return state, load_checkpoint_summary(checkpoint)


def load_checkpoint_summary(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder (its step and the identity of the run that wrote it), read without
    the weights and the optimizer state."""
    checkpoint = Path(checkpoint)
    try:
        return json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HardnegError(f"{checkpoint}: cannot read the checkpoint ({err})") from None


def check_compatible(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any],
                     ignored: tuple[str, ...]) -> None:
    """Refuse to resume when a setting that changes the result differs from the checkpoint's.

    ``saved``/``current`` are flat mappings (config fields, model identity, pools fingerprint);
    ``ignored`` names the settings that may change on resume (how often to save, the cache chunk).
    """
    differences = [f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
                   for key in sorted(set(saved) | set(current))
                   if key not in ignored and saved.get(key) != current.get(key)]
    if differences:
        raise HardnegError(f"cannot resume from {checkpoint}: it belongs to a different run ("
                           + "; ".join(differences) + "); resume with the same model and settings, or start "
                           "a new run in another output folder")
