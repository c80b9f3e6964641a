"""`difflab info PATH`: what a run folder, a checkpoint or a generated PNG (or .npy sidecar) holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder, a checkpoint folder, a PNG written by difflab, or a .npy output")
    p.add_argument("--json", action="store_true", help="print the raw JSON")


def run(args: argparse.Namespace) -> int:
    from difflab.errors import DifflabError

    path = Path(args.path)
    if not path.exists():
        raise DifflabError(f"'{path}' does not exist; pass a run folder, a checkpoint folder or a PNG")
    if path.is_file() and path.suffix in (".png", ".npy", ".json"):
        return _show_outputs(path, args.json)
    if (path / "model_index.json").is_file():
        return _show_diffusers(path)
    return _show_run(path, args.json)


def _show_diffusers(path: Path) -> int:
    """A diffusers pipeline folder, as difflab loads it."""
    from difflab.pipeline import load

    pipe = load(path)
    print(f"{path}: diffusers pipeline folder, {pipe.config.model.preset} ({pipe.config.model.backbone})")
    print(f"  samples       shape {pipe.sample_shape}; the network works at {pipe.model_shape}")
    print(f"  formulation   {pipe.config.process}: {pipe.config.formulation}")
    accepts = ", ".join(sorted(pipe.accepts)) or "none"
    print(f"  conditioning  {accepts}" + (f" ({pipe.num_classes} classes)" if pipe.num_classes else ""))
    if pipe.autoencoder is not None:
        print(f"  autoencoder   factor {pipe.autoencoder.factor}, scale factor {pipe.autoencoder.scale_factor:g}")
    return 0


def _show_outputs(path: Path, raw: bool) -> int:
    from difflab.outputs import read_generation_parameters

    meta = read_generation_parameters(path)
    if raw:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    print(f"{path}: made by difflab {meta.get('difflab_version', '?')} from {meta.get('checkpoint')} "
          f"(weights hash {meta.get('model_hash', '?')}, training step {meta.get('train_step', '?')})")  # fmt: skip
    keys = ("prompt", "negative_prompt", "sampler", "steps", "grid", "options", "seed", "n", "class", "label",
            "guidance", "negative_class", "guidance_interval", "classifier", "classifier_scale", "nfe")  # fmt: skip
    for key in keys:
        if meta.get(key) not in (None, {}, ""):
            print(f"  {key:<18} {meta[key]}")
    print(f"reproduce: difflab sample --from-png {path} --out again.png")
    return 0


def _show_run(path: Path, raw: bool) -> int:
    from difflab.nets.cost import network_cost
    from difflab.training.checkpoint import checkpoint_step, list_checkpoints, load_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    if _show_autoencoder(ckpt, raw):
        return 0
    config = load_config(ckpt)
    if raw:
        print(config.to_json())
        return 0
    settings = config.model.settings
    print(f"{ckpt}: step {checkpoint_step(ckpt)}")
    print(f"  formulation   {config.process}: {config.formulation}")
    print(f"  network       {config.model.backbone} '{config.model.preset}': {settings}")
    cost = network_cost(config.model, config.model_shape)  # a latent model works at its latents' shape
    print(f"  parameters    {cost.parameters:,}")
    print(f"  GFLOPs/sample {cost.gflops:.3g} (one forward pass, a multiply-add = 2 FLOPs; difflab.nets.cost)")
    print(f"  data          {config.data.name} ({config.data.kind}, shape {tuple(config.data.sample_shape)})")
    if config.latent is not None:
        latent = config.latent
        print(f"  latents       shape {config.model_shape}, scale factor {latent.scale_factor:.5g}, autoencoder "
              f"{latent.source} (weights {latent.weights_hash})")  # fmt: skip
    if config.unclip is not None:
        u = config.unclip
        print(f"  unCLIP        the {u.role}, reading the CLIP in {u.clip} (weights {u.clip_hash}, embeddings of size "
              f"{u.embed_dim}, images {u.image_size}x{u.image_size})")  # fmt: skip
    if config.distill is not None:
        d = config.distill
        print(f"  distilled     {d.method} distillation of {d.teacher} (weights {d.teacher_hash}); samples with "
              f"{d.sampler} in {d.steps} step{'s' if d.steps > 1 else ''} on the {d.grid} grid")  # fmt: skip
    signals = ", ".join(f"{s.name} (dropout {s.dropout:g})" for s in config.conditioning) or "none"
    print(f"  conditioning  {signals}")
    t = config.train
    print(f"  training      batch {t.batch_size}, lr {t.lr:g}, EMA {t.ema_decay:g}, seed {t.seed}, "
          f"mixed precision {t.mixed_precision}")  # fmt: skip
    run_dir = ckpt.parent.parent
    found = list_checkpoints(run_dir)
    if found:
        print(f"  checkpoints   {', '.join(p.name for p in found)} in {run_dir}")
    _show_tuned_grids(ckpt)
    return 0


def _show_tuned_grids(ckpt: Path) -> None:
    """The grids `difflab tune-grid` stored with the checkpoint (`--grid tuned`), one line each."""
    from difflab.tuned_grid import read_grids

    for i, g in enumerate(read_grids(ckpt).values()):
        held_out = "" if g.get("check_error") is None else (
            f", held-out {g['check_start_error']:.3g} -> {g['check_error']:.3g}")  # fmt: skip
        conditions = "".join(f", {k} {v}" for k, v in g.get("conditions", {}).items())
        print(f"  {'tuned grids' if i == 0 else '':<13} {g['sampler']} at {g['steps']} steps (weights "
              f"{g['weights_hash']}): error {g['start_error']:.3g} -> {g['error']:.3g} from the {g['start_grid']} "
              f"grid{held_out}{conditions}")  # fmt: skip


def _show_autoencoder(ckpt: Path, raw: bool) -> bool:
    """Print a `difflab train-autoencoder` checkpoint (True), or do nothing for another kind of run (False)."""
    from difflab.autoencoder.training import is_autoencoder_config, read_run
    from difflab.training.checkpoint import checkpoint_step
    from difflab.weights import read_config_text

    text = read_config_text(ckpt / "config.json")
    if not is_autoencoder_config(text):
        return False
    if raw:
        print(text)
        return True
    run, state = read_run(ckpt), json.loads((ckpt / "training_state.json").read_text())
    ae, shape = run.autoencoder, run.data.sample_shape
    print(f"{ckpt}: autoencoder, step {checkpoint_step(ckpt)}")
    print(f"  network       f = {ae.factor}, {ae.latent_channels} latent channels, width {ae.width}: {ae}")
    print(f"  data          {run.data.name} (shape {tuple(shape)}); latents {ae.latent_channels}x"
          f"{shape[-2] // ae.factor}x{shape[-1] // ae.factor}")  # fmt: skip
    print(f"  loss          {run.loss}")
    if "scale_factor" in state:
        print(
            f"  latents       scale factor {state['scale_factor']:.5g}, reconstruction PSNR {state['psnr_db']:.2f} dB"
        )
    else:
        print("  latents       scale factor not measured yet (training was stopped; resume it to finish)")
    return True
