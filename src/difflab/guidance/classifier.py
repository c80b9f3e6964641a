"""Noise-aware classifiers p(y | x, sigma) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4): trained with
cross-entropy on noised data x = x0 + sigma n, sigma log-uniform over a range covering every process's sampling
grid, then used through `difflab.guidance.classifier_guidance`.

The input is preconditioned like an EDM network (Karras et al. 2022, Table 1): c_in = 1/sqrt(sigma^2 + sigma_data^2)
keeps the network's input at unit scale and c_noise = ln(sigma)/4 tells it the noise level, so one classifier
serves any process (DDPM, VP, VE, EDM) in sigma space. A classifier folder has the layout of a run folder:
OUT/checkpoints/step_N/{config.json, model.safetensors, ema.safetensors, training_state.json}, written atomically
by `difflab.training.checkpoint.save_checkpoint`; config.json (format "difflab-noisy-classifier") is enough to
rebuild the network, and weights are only ever read with safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.nets.embeddings import NoiseEmbedding
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import ResBlock
from difflab.precond import EDMPrediction, edm_noise_conditioning
from difflab.sigmas import append_dims
from difflab.training.checkpoint import load_tensors, resolve_checkpoint, save_checkpoint

FORMAT = "difflab-noisy-classifier"
DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX = 0.002, 160.0  # covers DDPM (0.01..157), VP, VE (0.01..50) and EDM (0.002..80)
# width: MLP hidden size / CNN base channels; depth: MLP residual blocks / CNN ResBlocks per resolution
NET_DEFAULTS = {"points": {"width": 128, "depth": 3}, "images": {"width": 32, "depth": 1}}


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a noise-aware classifier (saved as config.json beside its weights)."""

    data: str  # the data set it was trained on (name or folder)
    kind: str  # "points" (MLP) or "images" (CNN)
    sample_shape: tuple[int, ...]
    num_classes: int
    width: int
    depth: int
    sigma_min: float = DEFAULT_SIGMA_MIN  # the training range; c_noise is clamped into it
    sigma_max: float = DEFAULT_SIGMA_MAX
    sigma_data: float = 0.5
    format: str = FORMAT
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        """The classifier's config from config.json (the training settings saved beside it are skipped)."""
        values = json.loads(text)
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            kind = "a diffusion model" if isinstance(values, dict) and "formulation" in values else "not a classifier"
            raise ValueError(f"{kind}: format is not '{FORMAT}'")
        values.pop("train", None)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown fields {', '.join(sorted(unknown))}")
        values["sample_shape"] = tuple(int(s) for s in values["sample_shape"])
        return cls(**values)


class ConvTrunk(nn.Module):
    """The U-Net's downsampling half as a classifier (Dhariwal & Nichol 2021, Sec. 4): conv, ResBlocks that add the
    noise embedding, strided-conv downsampling (levels 1, 2, 2 x channels, kept while the resolution stays >= 4),
    GroupNorm-SiLU, global average pool, linear head. x (B, C, R, R), c_noise (B,) -> (B, out_dim)."""

    def __init__(self, in_channels: int, resolution: int, channels: int, num_res_blocks: int, out_dim: int):
        super().__init__()
        mult, groups = [1, 2, 2], 8
        while len(mult) > 1 and resolution // 2 ** (len(mult) - 1) < 4:
            mult.pop()
        emb_dim = 4 * channels
        self.embed = NoiseEmbedding(channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.levels, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = channels
        for i, m in enumerate(mult):
            w = channels * m
            self.levels.append(
                nn.ModuleList(ResBlock(c if j == 0 else w, w, emb_dim, 0.0, groups) for j in range(num_res_blocks))
            )
            c = w
            if i < len(mult) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.head = nn.Sequential(nn.GroupNorm(min(groups, c), c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, out_dim))  # fmt: skip

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.embed(c_noise))
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h, emb)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        return self.head(h)


class NoisyClassifier(nn.Module):
    """classifier(x, sigma) -> logits (B, K) of p(y | x, sigma), x (B, *sample_shape) in sigma space
    (x = x0 + sigma n, data in [-1, 1]), sigma (B,) or a scalar.

    The network sees c_in x with c_in = 1/sqrt(sigma^2 + sigma_data^2) and c_noise = ln(sigma)/4, sigma clamped into
    the training range for c_noise only (so sigma = 0 is defined; below sigma_min the posterior hardly changes).
    Points go through the residual MLP, images through `ConvTrunk`. Inputs are cast to the weights' dtype.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.kind == "points":
            dim = cfg.sample_shape[0]
            mlp = MLPConfig(
                data_dim=dim, hidden=cfg.width, num_blocks=cfg.depth, embed_dim=cfg.width, out_dim=cfg.num_classes
            )
            self.net: nn.Module = MLP(mlp)
        elif cfg.kind == "images":
            channels, resolution = cfg.sample_shape[0], cfg.sample_shape[-1]
            self.net = ConvTrunk(channels, resolution, cfg.width, cfg.depth, cfg.num_classes)
        else:
            raise DifflabError(f"classifier kind must be 'points' or 'images', got '{cfg.kind}'")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).expand(x.shape[0])
        c_in = EDMPrediction(self.config.sigma_data).scalings(sigma).c_in
        c_noise = edm_noise_conditioning(sigma.clamp(self.config.sigma_min, self.config.sigma_max))
        return self.net(append_dims(c_in, x.ndim) * x, c_noise)


def build_classifier(config: ClassifierConfig, seed: int = 0) -> NoisyClassifier:
    """A freshly initialised classifier (weights from `seed`), built without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NoisyClassifier(config)


def classifier_config_for(
    dataset, num_classes: int | None = None, sigma_range: tuple[float, float] | None = None, **net: int
) -> ClassifierConfig:
    """The default classifier for a labelled `difflab.data.Dataset`: K = max label + 1 unless given; `net` may
    override width / depth. Unlabelled data is a DifflabError."""
    if dataset.labels is None:
        raise DifflabError(
            f"'{dataset.name}' has no labels to train a classifier on; use digits, moons, 8gaussians, checkerboard "
            "or rings"
        )
    lo, hi = sigma_range or (DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX)
    if not 0 < lo < hi:
        raise DifflabError(f"the classifier's sigma range must satisfy 0 < sigma_min < sigma_max, got {lo}, {hi}")
    k = num_classes or int(dataset.labels.max()) + 1
    sizes = NET_DEFAULTS[dataset.kind] | net
    return ClassifierConfig(dataset.name, dataset.kind, dataset.sample_shape, k, sizes["width"], sizes["depth"],
                            float(lo), float(hi))  # fmt: skip


def save_classifier(classifier: NoisyClassifier, out: str | Path, step: int = 0, state: dict | None = None) -> Path:
    """Write a classifier's weights and config to OUT/checkpoints/step_N atomically (keeping only that one)."""
    state = {"step": step} | (state or {})
    return save_checkpoint(Path(out), step, classifier.config, {"model": classifier.state_dict()}, state, keep=1)


def classifier_checkpoint(path: str | Path) -> Path:
    """A classifier folder, one of its checkpoint folders or a weights file -> the checkpoint folder."""
    return resolve_checkpoint(path, f"train one with `difflab train-classifier --data NAME --out {path}`")


def load_classifier(path: str | Path, device: torch.device | str = "cpu", *, use_ema: bool = True) -> NoisyClassifier:
    """The classifier saved by `train_classifier` (EMA weights if present), in eval mode on `device`. Its sizes are
    checked against `difflab.limits` and its weights file's header against them before anything is allocated; NaN/inf
    weights are refused (`difflab.weights`)."""
    from difflab.limits import check_limits
    from difflab.weights import check_header, meta_state, read_config_text

    ckpt = classifier_checkpoint(path)
    text = read_config_text(ckpt / "config.json")
    try:
        config = ClassifierConfig.from_json(text)
        check_limits(config, "classifier")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DifflabError(
            f"'{ckpt}/config.json' is not a noise-aware classifier ({err}); train one with `difflab train-classifier`"
        ) from None
    ema = ckpt / "ema.safetensors"
    weights = ema if use_ema and (ema.exists() or ema.is_symlink()) else ckpt / "model.safetensors"
    check_header(weights, meta_state(lambda: NoisyClassifier(config), "the classifier"))
    model = NoisyClassifier(config)
    try:
        model.load_state_dict(load_tensors(weights))
    except RuntimeError as err:
        raise DifflabError(f"'{weights}' does not match its config.json ({str(err).splitlines()[0]})") from None
    return model.to(device).eval()


def check_fits(classifier: NoisyClassifier, sample_shape: tuple[int, ...], num_classes: int | None = None) -> None:
    """Refuse a classifier for data of another shape, or with another class count than a conditional model."""
    cfg = classifier.config
    if tuple(cfg.sample_shape) != tuple(sample_shape):
        raise DifflabError(
            f"the classifier was trained on '{cfg.data}' samples of shape {tuple(cfg.sample_shape)}, but the model "
            f"makes samples of shape {tuple(sample_shape)}; train a classifier on the model's data"
        )
    if num_classes is not None and num_classes != cfg.num_classes:
        raise DifflabError(
            f"the classifier knows {cfg.num_classes} classes but the conditional model {num_classes}; use one "
            "trained on the same labels"
        )
