"""Greedy model soup over the models a training run scored on dev (Wortsman et al., 2022, "Model soups").

Fine-tuned weights from one run's dev evaluations (the end of each epoch, or every ``eval_steps``) often lie in one
basin, and their average can score higher than any of them. The greedy recipe keeps that safe: the ingredients
are taken best dev score first, and each is added to the soup only if the averaged weights then score *higher* on
dev than the soup without it. The soup replaces the best single model only when it beats it on dev, so asking
for a soup never gives a model that is worse on the selection signal.

Ingredients are the encoder's state dicts, written by rank 0 beside the checkpoints (``OUTPUT/soup/step-N.pt``)
and kept to the ``limit`` best by dev score, so the disk holds at most ``limit`` copies of the weights; a resumed
run drops those written after its checkpoint (it writes them again, identically). The folder is removed once the
soup is made.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from retriever.io import atomic_write

SOUP_DIR = "soup"


def ingredient_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / SOUP_DIR / f"step-{step:07d}.pt"


def save_ingredient(output_dir: str | os.PathLike, step: int, model: torch.nn.Module) -> None:
    """The weights at ``step``, written to a temporary name and renamed."""
    path = ingredient_path(output_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", encoding=None) as handle:
        torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, handle)


def ranked(scores: dict[int, float]) -> list[int]:
    """Steps best dev score first; equal scores: the earlier step first (as keep-best keeps the first best)."""
    return sorted(scores, key=lambda step: (-scores[step], step))


def prune(output_dir: str | os.PathLike, scores: dict[int, float], limit: int) -> None:
    """Keep the ingredients of the ``limit`` best steps of ``scores``; remove the others' files."""
    keep = set(ranked(scores)[:limit])
    folder = Path(output_dir) / SOUP_DIR
    for path in folder.glob("step-*.pt") if folder.is_dir() else ():
        if int(path.stem.split("-")[1]) not in keep:
            path.unlink()


def drop_after(output_dir: str | os.PathLike, step: int) -> None:
    """Remove the ingredients written after ``step`` (a resumed run writes them again)."""
    folder = Path(output_dir) / SOUP_DIR
    for path in folder.glob("step-*.pt") if folder.is_dir() else ():
        if int(path.stem.split("-")[1]) > step:
            path.unlink()


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the saved state dicts (floating tensors; others, e.g. position ids, from the first)."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                total.setdefault(name, tensor)
            elif name in total:
                total[name] += tensor.double()
            else:
                total[name] = tensor.double()
    return {name: (tensor / len(paths)).float() if tensor.is_floating_point() else tensor
            for name, tensor in total.items()}


def greedy_soup(output_dir: str | os.PathLike, scores: dict[int, float],
                evaluate: Callable[[dict[str, torch.Tensor]], float]) -> dict:
    """The greedy soup of the saved ingredients (``scores``: step -> dev score of each one saved).

    ``evaluate`` scores a state dict on dev. Returns ``{"steps": [...], "dev": score, "tried": [...],
    "state": state dict or None}``: ``state`` is None when no soup of two or more beat the best ingredient.
    """
    order = [step for step in ranked(scores) if ingredient_path(output_dir, step).is_file()]
    if not order:
        return {"steps": [], "dev": None, "tried": [], "state": None}
    chosen, best_score, best_state, tried = [order[0]], scores[order[0]], None, []
    for step in order[1:]:
        candidate = average([ingredient_path(output_dir, s) for s in [*chosen, step]])
        score = float(evaluate(candidate))
        tried.append({"added": step, "dev": round(score, 6)})
        if score > best_score:
            chosen, best_score, best_state = [*chosen, step], score, candidate
    return {"steps": chosen, "dev": best_score, "tried": tried, "state": best_state}


def remove(output_dir: str | os.PathLike) -> None:
    shutil.rmtree(Path(output_dir) / SOUP_DIR, ignore_errors=True)
