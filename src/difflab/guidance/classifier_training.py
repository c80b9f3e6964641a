"""Training a noise-aware classifier p(y | x, sigma) (Dhariwal & Nichol 2021, Sec. 4) with the shared `Trainer`:
cross-entropy on x = x0 + sigma n, ln sigma ~ U[ln sigma_min, ln sigma_max], saved by the shared checkpoint code
(EMA and raw weights, config.json with the training settings, test accuracy in training_state.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab import distributed
from difflab.config import TrainConfig
from difflab.errors import DifflabError
from difflab.guidance.classifier import ClassifierConfig, build_classifier, classifier_checkpoint
from difflab.sigmas import append_dims
from difflab.training.checkpoint import latest_checkpoint
from difflab.training.trainer import Trainer

TRAIN_DEFAULTS = {"points": {"batch_size": 256, "lr": 1e-3}, "images": {"batch_size": 128, "lr": 1e-3}}


def classifier_train_config(kind: str = "points", **overrides: Any) -> TrainConfig:
    """Training settings for a classifier of `kind` data: 2000 steps, AdamW (weight decay 0.01) with 100 warm-up
    steps, EMA 0.999 (0 = off), one checkpoint kept; keyword arguments override."""
    base = TrainConfig(steps=2000, weight_decay=0.01, warmup_steps=100, ema_decay=0.999, keep_checkpoints=1,
                       log_every=100, checkpoint_every=10**9, **TRAIN_DEFAULTS[kind])  # fmt: skip
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class ClassifierRun:
    """A classifier's config and its training settings: what config.json of a classifier folder holds."""

    classifier: ClassifierConfig
    train: TrainConfig

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self.classifier) | {"train": dataclasses.asdict(self.train)}, indent=2,
                          sort_keys=True)  # fmt: skip


class ClassifierTask:
    """The Trainer's view of a classifier: its module, config and per-sample cross-entropy on noised data. The
    labels arrive as the `class_label` signal, never dropped."""

    signals = ("class_label",)
    dropout: dict[str, float] = {}

    def __init__(self, run: ClassifierRun):
        self.config, self.classifier = run, run.classifier
        self.module = build_classifier(run.classifier, run.train.seed)

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def loss(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy of p(y | x0 + sigma n, sigma) (Dhariwal & Nichol 2021, Sec. 4): x0 (B, *shape), labels
        cond["class_label"] (B,) -> (B,); ln sigma ~ U[ln sigma_min, ln sigma_max]."""
        lo, hi = math.log(self.classifier.sigma_min), math.log(self.classifier.sigma_max)
        sigma = (lo + (hi - lo) * distributed.rand(len(x0), generator=generator, device=x0.device)).exp()
        x = x0 + append_dims(sigma, x0.ndim) * distributed.randn(x0.shape, generator=generator, device=x0.device)
        return F.cross_entropy(self.module(x, sigma), cond["class_label"], reduction="none")

    def check_resume(self, ckpt: Path) -> None:
        raise DifflabError("classifier runs do not resume; train into a new --out")


@torch.no_grad()
def accuracy(
    classifier: nn.Module, data: torch.Tensor, labels: torch.Tensor, sigma: float, seed: int = 0, batch: int = 1024
) -> float:
    """Share of data (N, ...) classified correctly after adding noise of std sigma (seeded; sigma 0 = clean)."""
    device = next(classifier.parameters()).device
    gen, correct = torch.Generator().manual_seed(seed), 0
    for i in range(0, len(data), batch):
        x0 = data[i : i + batch]
        x = x0 + sigma * torch.randn(x0.shape, generator=gen) if sigma > 0 else x0
        sig = torch.full((len(x0),), float(sigma), device=device)
        correct += int((classifier(x.to(device), sig).argmax(1).cpu() == labels[i : i + batch]).sum())
    return correct / len(data)


@dataclass
class ClassifierResult:
    checkpoint: Path
    step: int
    stopped_by: str  # "steps", "minutes" or "signal"
    elapsed_s: float
    test_accuracy: dict[str, float] | None  # sigma (as text; "clean" = x0 itself) -> test-split accuracy; None if
    signal: str | None = None  # the stop signal's name (SIGTERM, SIGHUP, SIGINT) when one ended training early


def train_classifier(
    config: ClassifierConfig,
    tc: TrainConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    eval_sigmas: tuple[float, ...] = (0.1, 0.5, 1.0),
    progress: bool = False,
) -> ClassifierResult:
    """Train `config`'s classifier on (data (N, *shape) in [-1, 1], labels (N,) int64) into `out` with the shared
    Trainer; batch indices, sigma and noise come from generators seeded with tc.seed, the initial weights from
    tc.seed, so a run is reproducible on one machine. The test-split accuracy (clean, and at `eval_sigmas`) of the
    weights `load_classifier` returns (EMA) is stored in training_state.json and returned (not measured when a stop
    signal ended training)."""
    data, labels = train
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise DifflabError(
            f"labels must lie in 0..{config.num_classes - 1} for a {config.num_classes}-class classifier"
        )
    trainer = Trainer(ClassifierTask(ClassifierRun(config, tc)), data, Path(out), torch.device(device),
                      cond_data={"class_label": labels})  # fmt: skip
    result = trainer.run(progress=progress)
    if result.stopped_by == "signal":  # pre-empted: the checkpoint of the step reached is written; stop promptly
        return ClassifierResult(latest_checkpoint(out), result.step, "signal", round(trainer.elapsed, 2), None,
                                result.signal)  # fmt: skip
    final = build_classifier(config).to(device)
    final.load_state_dict(trainer.ema.state_dict())
    final.eval()
    test_acc = {"clean": accuracy(final, *test, 0.0)} | {f"{s:g}": accuracy(final, *test, s) for s in eval_sigmas}
    trainer.extra_state = {"stopped_by": result.stopped_by, "test_accuracy": test_acc}
    ckpt = trainer.save()  # the same step again, now with the test accuracy
    return ClassifierResult(ckpt, result.step, result.stopped_by, round(trainer.elapsed, 2), test_acc)


def training_state(path: str | Path) -> dict[str, Any]:
    """The training_state.json of a classifier (step, budget, test accuracy)."""
    return json.loads((classifier_checkpoint(path) / "training_state.json").read_text())
