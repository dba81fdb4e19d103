"""Where training metrics go besides ``logs/train_log.jsonl``: TensorBoard, as ``report_to`` in HF's Trainer.

Why a module of its own: the trainer calls :meth:`Reporter.scalars` and never knows which backend listens, so a
second backend (W&B, MLflow) is one class here. The backend is imported when a run asks for it, so training
without it needs no extra package, and asking without it installed fails before the model loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from retriever.io import HardnegError

REPORT_TARGETS = ("none", "tensorboard")  # the choices of the report_to setting


class Reporter:
    """Discards everything: ``report_to: none``."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (name -> number) at ``step``; names use ``/`` to group (``train/loss``)."""

    def close(self) -> None:
        """Flush and release the backend."""


class TensorBoardReporter(Reporter):
    """Event files under ``folder`` that ``tensorboard --logdir`` shows and its event reader reads back."""

    def __init__(self, folder: str | os.PathLike, *, first_step: int = 0) -> None:
        writer_class = tensorboard_writer_class()
        Path(folder).mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run drops what the killed run logged after its checkpoint, so curves do not fork
        self.writer = writer_class(log_dir=str(folder), purge_step=first_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_writer_class():
    """torch's ``SummaryWriter``, or a one-line error saying which extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise HardnegError("train: report_to tensorboard needs the tensorboard package: "
                           "pip install 'hardneg[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


def check_report_target(target: str) -> None:
    """Fail now, before any model is loaded, when the backend ``target`` names is not installed."""
    if target == "tensorboard":
        tensorboard_writer_class()


def open_reporter(target: str, folder: str | os.PathLike, *, first_step: int = 0) -> Reporter:
    """The reporter ``report_to`` names, writing under ``folder``."""
    check_report_target(target)
    return TensorBoardReporter(folder, first_step=first_step) if target == "tensorboard" else Reporter()
