"""Figures of a text-to-image model (issue 12): rows of samples labelled with their prompts, caption adherence and FD
against the guidance scale, and how often two-object relations come out reversed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.viz.figures import make_grid, new_figure, save_figure

SPLIT_LABELS = {"train": "seen compositions (train)", "test": "held-out compositions (test)"}


def save_prompt_rows(images: torch.Tensor, labels: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """One row per label, its images side by side, the label above the row.

    images: (len(labels) * k, 3, R, R) in [-1, 1], row j = images[j * k : (j + 1) * k] (k seeds per prompt)."""
    rows = len(labels)
    if rows < 1 or len(images) % rows:
        raise DifflabError(f"got {len(images)} images for {rows} labelled rows; give the same number for each row")
    per_row = len(images) // rows
    fig = new_figure(max(4.5, 1.1 * per_row + 0.4), 1.35 * rows + (0.4 if title else 0.1))
    for j, label in enumerate(labels):
        ax = fig.add_subplot(rows, 1, j + 1)
        ax.imshow(make_grid(images[j * per_row : (j + 1) * per_row], nrow=per_row), interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _split_series(rows: Sequence[dict[str, Any]], get) -> dict[str, tuple[list[float], list[float]]]:
    """split -> (guidance scales, values) for the rows where the split has a value."""
    series = {}
    for split in SPLIT_LABELS:
        points = [(r["guidance"], get(r, split)) for r in rows]
        points = [(w, v) for w, v in points if w is not None and v is not None]
        if points:
            series[split] = ([w for w, _ in points], [v for _, v in points])
    return series


def save_guidance_sweep(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Full-caption accuracy (left) and FD in the shapes evaluator's feature space (right) against the guidance
    scale w, one line per split; rows as `difflab.eval.adherence.sweep_guidance` returns them."""
    if not rows:
        raise DifflabError("nothing to plot: the guidance sweep has no rows")
    fig = new_figure(9.0, 3.6)
    panels = (
        ("full-caption accuracy", lambda r, s: r["adherence"].get(s, {}).get("full")),
        ("FD (shapes features)", lambda r, s: r["fd"].get(s)),
    )
    for k, (name, get) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for split, (w, v) in _split_series(rows, get).items():
            ax.plot(w, v, marker="o", label=SPLIT_LABELS[split])
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.axes[0].set_ylim(0, 1.02)
    fig.suptitle(title or "caption adherence and FD against guidance", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_relation_reversals(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Of the two-object relation samples at each guidance scale: the share with both objects found, with the
    relation right, and with it reversed ("X left of Y" drawn as "Y left of X"); rows from
    `difflab.text_demo.relation_sweep` (guidance, n, both_found, correct, reversed)."""
    if not rows:
        raise DifflabError("nothing to plot: the relation sweep has no rows")
    fig = new_figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    w = [r["guidance"] for r in rows]
    for key, label in (("both_found", "both objects found"), ("correct", "relation right"),
                       ("reversed", "relation reversed")):  # fmt: skip
        ax.plot(w, [r[key] / max(r["n"], 1) for r in rows], marker="o", label=label)
    found = [(r["guidance"], r["reversed_share"]) for r in rows if r["reversed_share"] is not None]
    if found:
        ax.plot(*zip(*found, strict=True), marker="s", linestyle="--", label="reversed, of those with both found")
    ax.set_ylim(0, 1)
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("share of relation samples")
    ax.set_title(title or "two-object relations: right, reversed", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
