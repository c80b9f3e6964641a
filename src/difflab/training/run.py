"""Training as a library call: `run_config(...)` builds a RunConfig from the settings a user names, `train(config, out)`
trains it (or continues it) and returns the run folder. The CLI's `difflab train` only parses and calls these."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from difflab import distributed
from difflab.cascade import UpsamplerConfig, check_upsample_from
from difflab.config import DataConfig, RunConfig, SignalConfig, TrainConfig
from difflab.data import Dataset
from difflab.errors import DifflabError, flag
from difflab.formulations import DataInfo, formulation_class, make_config, make_formulation
from difflab.inpaint_model import InpaintingConfig
from difflab.latent import LatentConfig, latent_config_of, latent_dataset, training_autoencoder
from difflab.nets import ModelConfig, model_config_for
from difflab.text.conditioned import FrozenTextConfig, TextConfig
from difflab.training.checkpoint import check_run_folder, latest_checkpoint, load_config, resume_checkpoint
from difflab.training.hooks import add_hooks
from difflab.training.init_from import finetune_config, initial_weights, refuse_source_settings
from difflab.training.lock import run_lock
from difflab.training.signals import load_training_data, training_signals  # noqa: F401  (also imported from here)
from difflab.training.tasks import DenoiserTask
from difflab.training.threads import oversubscription_warning
from difflab.training.trainer import Trainer, TrainResult, read_log
from difflab.unclip.link import prior_settings, unclip_model_data

# Defaults that differ between low-dimensional points and images.
DEFAULTS = {"points": {"batch_size": 256, "lr": 1e-3}, "images": {"batch_size": 128, "lr": 5e-4}}
# Steps below which a time-budgeted run is reported as stopped far short of what its data needs (measured: the
# digits demo's FD reaches its plateau after ~3,000 steps; the 2-D toys after ~1,000).
USEFUL_STEPS = {"points": 1000, "images": 3000}


def run_config(
    data: Dataset,
    *,
    process: str = "ddpm",
    model: str = "tiny",
    backbone: str | None = None,
    dropout: float = 0.0,
    conditional: bool = False,
    label_dropout: float = 0.1,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    warmup: int = 200,
    lr_schedule: str = "constant",
    ema_decay: float = 0.999,
    min_snr_gamma: float | None = None,
    mixed_precision: str = "no",
    seed: int = 0,
    checkpoint_every: int = 1000,
    preview_every: int | None = None,
    tensorboard: bool = False,
    text_encoder: str | None = None,
    caption_dropout: float = 0.2,
    upsample_from: int | None = None,
    low_res_noise_max: float | None = None,
    inpainting: bool = False,
    init_from: str | Path | None = None,
    patch_size: int | None = None,
    attention_levels: int | None = None,
    autoencoder: str | Path | None = None,
    clip: str | Path | None = None,
    unclip: str | None = None,
    image_embed_dropout: float = 0.1,
    image_embed_hidden: int | None = None,
    image_tokens: int | None = None,
    **formulation_settings: Any,
) -> RunConfig:
    """The RunConfig of a new run on `data` (a loaded `difflab.data.Dataset`). `process` names the formulation
        (ddpm, vp, subvp, ve, edm, pfgmpp, pfgm) and `formulation_settings` its settings (schedule, timesteps,
        prediction, sigma_min, sigma_max, aug_dim, ...; None = the paper's value). `conditional` trains on the data's
        class labels with `label_dropout` of them nulled; `text_encoder="scratch"` trains on the data's captions with a
    text transformer of its own (GLIDE), "minilm" or "hf:PATH" with a frozen encoder's embeddings of them (cached on
    disk, `difflab.text.encode_cached`), `caption_dropout` of them replaced by the empty caption. `upsample_from` makes
    the run a cascade's upsampler; `inpainting` GLIDE's inpainting model (random masks per step; difflab.inpaint_model).
    `patch_size` p runs a U-Net on p x p patches (about 1/p^2 of the cost; `difflab.nets.unet.UNet`);
    `attention_levels` N puts its attention at its N lowest levels (tiny, small: 1; base: 2).
    `init_from` (a run or checkpoint) fine-tunes it: network, text encoder and formulation are that run's, its weights
    the start (`difflab.training.init_from`). `autoencoder` (a `difflab train-autoencoder` folder) makes it a latent
    model: it learns the autoencoder's scaled latents of the images (`difflab.latent`). `unclip` ("prior" or "decoder")
    with `clip` (a `difflab train-clip` folder) makes it one of unCLIP's models (`difflab.unclip`): the prior, a
    transformer over the CLIP's image embeddings conditioned on its text tower (ddpm: cosine schedule, x0-prediction
    unless given), or the decoder, an image model conditioned on the embedding (`image_embed_dropout` of them nulled;
    `image_embed_hidden` N reads it through a SiLU layer of width N, `image_tokens` the context tokens it is projected
    into, default 4, `difflab.nets.image_embed`).
    Steps default to 5000 unless `minutes` is given."""
    if init_from is not None:
        refuse_source_settings(text_encoder, attention_levels, formulation_settings)
    defaults = DEFAULTS[data.kind]
    latent, model_data = _latent(data, autoencoder, upsample_from, inpainting, init_from)
    unclip_config, model_data = unclip_model_data(model_data, clip, unclip, init_from)
    if unclip == "prior":
        if text_encoder is not None:
            raise DifflabError("the prior reads its CLIP's text tower: drop --text-encoder")
        text_encoder, backbone = f"clip:{unclip_config.clip}", backbone or "prior"
        formulation_settings = prior_settings(process, formulation_settings)
    norm = float(model_data.data.flatten(1).pow(2).sum(1).mean().sqrt())
    info = DataInfo(model_data.sample_shape, norm, defaults["batch_size"])
    formulation_settings = _decoder_levels(process, formulation_settings, model_data.kind == "images" and not latent)
    formulation = make_config(process, info, **formulation_settings)
    klass = formulation_class(process)
    formulation_object = klass(formulation)
    num_classes = _num_classes(data, conditional)
    resolution = data.sample_shape[-1] if data.kind == "images" else None
    channels = data.sample_shape[0] if data.kind == "images" else 1
    data_config = DataConfig(data.name, model_data.kind if unclip == "prior" else data.kind,
                             tuple(model_data.sample_shape if unclip == "prior" else data.sample_shape), resolution,
                             channels)  # fmt: skip
    text = _text_config(data, text_encoder)
    upsampler = _upsampler_config(data, upsample_from, low_res_noise_max)
    inpaint = _inpainting_config(data, inpainting)
    width = {} if text is None else {"context_dim": text.dim, "pooled_dim": text.pooled_dim}
    width |= {} if upsampler is None else {"low_res_channels": channels}
    width |= {} if inpaint is None else {"inpaint_channels": channels}
    width |= {} if patch_size is None else {"patch_size": patch_size}
    reading = {k: v for k, v in (("image_embed_hidden", image_embed_hidden), ("image_tokens", image_tokens))
               if v is not None}  # fmt: skip
    if reading and unclip != "decoder":
        flags = ", ".join(flag(k) for k in reading)
        raise DifflabError(f"{flags}: how an unCLIP decoder reads its image embedding; use with difflab train-decoder")
    if unclip == "decoder":  # the unit embedding read at unit variance per coordinate, as the prior draws it
        width |= {"image_embed_dim": unclip_config.embed_dim, "image_embed_scale": unclip_config.embed_scale, **reading}
    extra_outputs = formulation_object.extra_outputs_for(model_data.sample_shape)
    model_config = model_config_for(model_data.kind, model_data.sample_shape, model, dropout, extra_outputs,
                                    num_classes, backbone, **width)  # fmt: skip
    model_config = replace(model_config, text=text)
    if attention_levels is not None:
        model_config = _with_attention_levels(model_config, attention_levels)
    train = TrainConfig(
        steps=steps if steps is not None or minutes is not None else 5000,
        minutes=minutes,
        batch_size=formulation_object.default_batch_size(defaults["batch_size"]) if batch_size is None else batch_size,
        lr=defaults["lr"] if lr is None else lr,
        warmup_steps=warmup,
        lr_schedule=lr_schedule,
        ema_decay=ema_decay,
        min_snr_gamma=min_snr_gamma,
        mixed_precision=mixed_precision,
        seed=seed,
        checkpoint_every=checkpoint_every,
        preview_every=preview_every,
        tensorboard=tensorboard,
    )
    conditioning = (SignalConfig("class_label", label_dropout),) if num_classes else ()
    if text is not None:  # a frozen encoder's caption is nulled as a whole: the group "text" (conditioning.py)
        caption = "text" if isinstance(text, FrozenTextConfig) else "text_tokens"
        conditioning += (SignalConfig(caption, caption_dropout),)
    conditioning += (SignalConfig("low_res", 0.0),) if upsampler is not None else ()  # never dropped
    conditioning += (SignalConfig("image_embed", image_embed_dropout),) if unclip == "decoder" else ()
    config = RunConfig(data_config, model_config, formulation, train, conditioning, upsampler=upsampler,
                       inpainting=inpaint, latent=latent, unclip=unclip_config)  # fmt: skip
    if init_from is not None:
        config = finetune_config(config, init_from, caption_dropout)
    make_formulation(config.formulation).loss(min_snr_gamma)  # refuse what the loss cannot take now, not at step 1
    return config


def _latent(data: Dataset, autoencoder: str | Path | None, upsample_from: int | None, inpainting: bool,
            init_from: str | Path | None) -> tuple[LatentConfig | None, Dataset]:  # fmt: skip
    """The LatentConfig of `autoencoder` and the data as its latents; (None, data) without one."""
    if autoencoder is None:
        return None, data
    if data.kind != "images":
        raise DifflabError(f"--autoencoder is for images; '{data.name}' holds {data.kind}")
    given = [flag for flag, value in (("--upsample-from", upsample_from), ("--inpainting", inpainting),
                                      ("--init-from", init_from)) if value]  # fmt: skip
    if given:
        raise DifflabError(f"{', '.join(given)} with --autoencoder is not supported yet; train in pixel space")
    latent, model = latent_config_of(autoencoder)
    return latent, latent_dataset(data, latent, model)


def _decoder_levels(process: str, settings: dict[str, Any], pixels: bool) -> dict[str, Any]:
    """Improved DDPM's hybrid loss discretises its decoder over 256 levels for pixel images; points and latents are
    continuous (decoder_levels 0: the Gaussian density), unless given."""
    if not settings.get("hybrid_loss") or settings.get("decoder_levels") is not None:
        return settings
    if "decoder_levels" not in {f.name for f in dataclasses.fields(formulation_class(process).Config)}:
        return settings  # make_config names the foreign flags
    return settings | {"decoder_levels": 256 if pixels else 0}


def _num_classes(data: Dataset, conditional: bool) -> int | None:
    """The number of classes for a conditional model (labels 0..K-1 of the data), else None."""
    if not conditional:
        return None
    if data.labels is None:
        raise DifflabError(
            f"--conditional needs labelled data; '{data.name}' has no labels (use digits, moons, 8gaussians, "
            "checkerboard or rings)"
        )
    return int(data.labels.max()) + 1


def _text_config(data: Dataset, text_encoder: str | None) -> TextConfig | FrozenTextConfig | None:
    """The scratch text encoder's config for the data's captions, the frozen encoder's (loaded to record its weights'
    name and sizes), or None without `text_encoder`."""
    if text_encoder is None:
        return None
    from difflab.text import make_text_encoder, parse_text_encoder

    kind, _ = parse_text_encoder(text_encoder)
    if not data.captions:
        raise DifflabError(f"--text-encoder needs captioned data; '{data.name}' has no captions (use --data shapes)")
    if kind != "scratch":
        return FrozenTextConfig.of(make_text_encoder(text_encoder))
    return TextConfig.from_captions(list(data.captions))


def _upsampler_config(data: Dataset, upsample_from: int | None, noise_max: float | None) -> UpsamplerConfig | None:
    """The upsampler settings of a cascade's super-resolution run, or None without `upsample_from`."""
    if upsample_from is None:
        if noise_max is not None:
            raise DifflabError("--low-res-noise-max sets the augmentation of an upsampler: give --upsample-from R too")
        return None
    if data.kind != "images":
        raise DifflabError(f"--upsample-from trains an image upsampler; '{data.name}' holds {data.kind}")
    check_upsample_from(data.sample_shape[-1], upsample_from)
    return UpsamplerConfig(upsample_from) if noise_max is None else UpsamplerConfig(upsample_from, noise_max)


def _inpainting_config(data: Dataset, inpainting: bool) -> InpaintingConfig | None:
    """The inpainting settings of GLIDE's inpainting model, or None without `inpainting`."""
    if not inpainting:
        return None
    if data.kind != "images":
        raise DifflabError(f"--inpainting trains an image model; '{data.name}' holds {data.kind}")
    return InpaintingConfig()


@dataclass
class TrainOutcome(TrainResult):
    warning: str | None = None  # a time-budgeted run that stopped far short of what its data needs


def train(
    config: RunConfig | None = None,
    out: str | Path | None = None,
    *,
    data: Dataset | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    compile: bool = False,
) -> Path:
    """Train `config` into the run folder `out` (default runs/<data>-<process>) and return the folder.

    With `resume`, continue the run in `out` from its latest checkpoint (the config is read from there; `steps` /
    `minutes` replace its budget). The global RNG is seeded with the config's seed (dropout) and restored exactly on
    resume. Writes config.json, train_log.jsonl, loss.png and checkpoints/step_N/. `compile` runs the network
    through torch.compile. Under torchrun, every rank calls this and trains its shard of each batch
    (`difflab.distributed`); a group that torchrun restarts after a failure continues from the latest checkpoint."""
    return train_run(config, out, data=data, device=device, resume=resume, steps=steps, minutes=minutes,
                     progress=progress, compile=compile).run_dir  # fmt: skip


def _with_attention_levels(config: ModelConfig, levels: int) -> ModelConfig:
    from difflab.nets.unet import with_attention_levels

    if config.backbone != "unet":
        raise DifflabError(f"--attention-levels is for the unet backbone; the {config.backbone} backbone has no levels")
    return replace(config, settings=with_attention_levels(config.settings, levels))


def train_run(
    config: RunConfig | None,
    out: str | Path | None,
    *,
    data: Dataset | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    compile: bool = False,
) -> TrainOutcome:
    """`train`, returning the outcome (steps done, what stopped it, skipped steps, a short-run warning). Holds
    RUN/.lock throughout (rank 0 of a torchrun group): a second process training into the same folder is refused."""
    world, device = distributed.join(torch.device(device))
    out = _run_folder(config, out)
    check_run_folder(out)
    resume = resume or continues_after_restart(out)
    if resume and latest_checkpoint(out) is None:  # before the lock, which would create the folder
        raise DifflabError(f"--resume latest: '{out}' holds no checkpoint; start the run without --resume")
    with run_lock(out) if world.is_main else contextlib.nullcontext():
        start = (lambda: _resumed(out, steps, minutes)) if resume else (lambda: (None, _new_run_config(config, out)))
        ckpt, config = world.from_main(start)  # every rank continues from the checkpoint rank 0 chose
        data = data if data is not None else load_training_data(config)
        autoencoder = None
        if config.latent is not None:  # the latents of the images, from the run's own copy once it has one
            autoencoder = training_autoencoder(config.latent, ckpt)
            data = latent_dataset(data, config.latent, autoencoder)
        signals = None
        if config.unclip is not None:  # a prior learns the CLIP's embeddings; a decoder is conditioned on them
            from difflab.unclip.link import unclip_training_data

            data, signals = unclip_training_data(config.unclip, data)
        torch.manual_seed(config.train.seed + world.rank)  # global RNG (dropout); saved and restored per rank
        task = DenoiserTask(config, autoencoder)
        if ckpt is None and config.train.init_from is not None:
            initial_weights(task.module, config.train.init_from)
        cond_data = (training_signals(config, data) or {}) | (signals or {})
        trainer = Trainer(task, data.data, out, device, cond_data=cond_data or None, world=world, compile=compile)
        if ckpt is not None:
            trainer.resume(ckpt)
        warning = oversubscription_warning()  # once the settings are known to be valid: errors stay one line
        if warning and world.is_main:
            print(f"difflab train: {warning}", file=sys.stderr)
        if world.is_main:
            add_hooks(trainer, config, out)
        result = trainer.run(progress=progress)
    if result.stopped_by != "signal" and world.is_main:  # pre-empted: exit promptly (the curve can be drawn later)
        _save_loss_curve(out)
    outcome = TrainOutcome(result.run_dir, result.step, result.skipped_steps, result.stopped_by, result.signal)
    need = USEFUL_STEPS[config.data.kind]
    if result.stopped_by == "minutes" and result.step < need:
        outcome.warning = (
            f"the time budget ended after {result.step} steps, far short of the ~{need} this data needs to sample "
            "well (the machine may be busy); expect poor samples, or train a fixed number with --steps"
        )
    return outcome


def continues_after_restart(out: str | Path) -> bool:
    """Whether torchrun (--max-restarts) has restarted this group after a failure and `out` holds a checkpoint to
    continue from: then the same command resumes instead of refusing the existing run."""
    return distributed.restart_count() > 0 and latest_checkpoint(out) is not None


def _run_folder(config: RunConfig | None, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    if config is None:
        raise DifflabError("give a config or a run folder to resume")
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(config.data.name).name}-{config.process}")


def _new_run_config(config: RunConfig | None, out: Path) -> RunConfig:
    if config is None:
        raise DifflabError("give the RunConfig to train (see difflab.run_config)")
    if latest_checkpoint(out) is not None:
        raise DifflabError(f"'{out}' already holds a run; pass --resume latest to continue it, or a new --out")
    return config


def _resumed(out: Path, steps: int | None, minutes: float | None) -> tuple[Path, RunConfig]:
    """The checkpoint to continue from (the newest intact one, saying so when a newer one is corrupt) and its
    config with the new budget."""
    ckpt, warning = resume_checkpoint(out)
    if warning:
        print(f"difflab train: warning: {warning}", file=sys.stderr)
    if ckpt is None:
        raise DifflabError(f"--resume latest: '{out}' holds no intact checkpoint; start a new run with a new --out")
    config = load_config(ckpt)
    if steps is not None or minutes is not None:
        config = replace(config, train=replace(config.train, steps=steps, minutes=minutes))
    return ckpt, config


def _save_loss_curve(out: Path) -> None:
    from difflab.viz import save_loss_curve

    log = read_log(out)
    if log:
        save_loss_curve([r["step"] for r in log], [r["loss"] for r in log], out / "loss.png")
