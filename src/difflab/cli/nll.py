"""`difflab nll`: negative log-likelihood in bits/dim via the probability-flow ODE (and the DDPM bound)."""

from __future__ import annotations

import argparse
import json
import math

from difflab.cli.common import add_runtime_arguments, setup_runtime
from difflab.errors import DifflabError

DIGIT_LEVELS = 17  # scikit-learn's digits hold 17 grey levels (0..16)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint")
    p.add_argument("--data", help="data to score (default: the checkpoint's training data, test split)")
    p.add_argument("--n", type=int, default=256, help="number of data points (default 256)")
    p.add_argument("--divergence", choices=("auto", "exact", "hutchinson"), default="auto",
                   help="exact trace (data dim <= 16) or Hutchinson with one probe held fixed per solve")  # fmt: skip
    p.add_argument("--probe", choices=("rademacher", "gaussian"), default="rademacher")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--vlb", action="store_true", help="ddpm models: also the variational bound (T network calls), "
                   "with the model's learned variance if it has one")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_runtime_arguments(p)


def _integer_levels(images, n_bins: int):
    """Images in [-1, 1] stored on a grid of n_bins levels -> integer levels (N, ...)."""
    return ((images + 1) / 2 * (n_bins - 1)).round().long().clamp(0, n_bins - 1)


def _mean_and_error(values) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise DifflabError(f"--n must be at least 1, got {args.n}")
    if args.out:
        from difflab.atomic import check_writable_file

        check_writable_file(args.out, "--out")  # before the solves
    import torch
    from tqdm.auto import tqdm

    from difflab.data import TOY_NAMES, load_dataset
    from difflab.eval.likelihood import ddpm_vlb_bits_per_dim, dequantized_bits_per_dim, pf_ode_log_likelihood
    from difflab.pipeline import load

    device = setup_runtime(args)
    model = load(args.ckpt, device=device)
    data_cfg, formulation = model.config.data, model.formulation
    if formulation.nll_refusal:
        raise DifflabError(formulation.nll_refusal)
    if model.autoencoder is not None:
        raise DifflabError(
            f"'{args.ckpt}' is a latent model: the ODE gives the likelihood of its latents, not of the images (the "
            "decoder is not invertible); difflab nll takes pixel-space models"
        )
    name = args.data or data_cfg.name
    res = data_cfg.resolution if data_cfg.kind == "images" else None
    data = load_dataset(name, split="test", resolution=res, channels=data_cfg.channels).data[: args.n]
    if tuple(data.shape[1:]) != tuple(data_cfg.sample_shape):
        raise DifflabError(f"data of shape {tuple(data.shape[1:])} do not fit a model of {data_cfg.sample_shape}")
    sigma_min, sigma_max = formulation.sigma_range()
    n_bins = DIGIT_LEVELS if name == "digits" else 256
    if args.vlb and (formulation.discrete_schedule is None or name in TOY_NAMES):
        raise DifflabError("--vlb needs a discrete (ddpm) model of image data (its decoder is discrete)")
    g = torch.Generator().manual_seed(args.seed)
    kw = dict(sigma_min=sigma_min, sigma_max=sigma_max, divergence=args.divergence, probe=args.probe, generator=g,
              rtol=args.rtol, atol=args.atol, kernel=model.kernel)  # fmt: skip
    bpd, nfe, vlb = [], 0, []
    starts = range(0, len(data), args.batch_size)
    for start in tqdm(starts, desc="nll", disable=args.no_progress, dynamic_ncols=True):
        batch = data[start : start + args.batch_size].to(device)
        if name in TOY_NAMES:
            out = pf_ode_log_likelihood(model.denoiser, batch, **kw)
        else:
            out = dequantized_bits_per_dim(model.denoiser, _integer_levels(batch, n_bins), n_bins=n_bins, **kw)
        bpd.append(out["bits_per_dim"].cpu())
        nfe += out["nfe"]
        if args.vlb:
            bound = ddpm_vlb_bits_per_dim(model.denoiser, formulation.discrete_schedule, batch, n_bins=n_bins,
                                          generator=g)  # fmt: skip
            vlb.append(bound["bits_per_dim"])
    result = {"data": name, "n": len(data), "checkpoint": str(model.checkpoint), "sigma_min": sigma_min,
              "sigma_max": sigma_max, "divergence": args.divergence, "nfe": nfe,
              "dequantized": name not in TOY_NAMES, "n_bins": None if name in TOY_NAMES else n_bins}  # fmt: skip
    result["bits_per_dim"], result["bits_per_dim_stderr"] = _mean_and_error(torch.cat(bpd))
    line = f"PF-ODE NLL: {result['bits_per_dim']:.4f} +- {result['bits_per_dim_stderr']:.4f} bits/dim"
    if vlb:
        result["vlb_bits_per_dim"], result["vlb_bits_per_dim_stderr"] = _mean_and_error(torch.cat(vlb).cpu())
        result["vlb_learned_variance"] = bool(getattr(model.denoiser, "learns_variance", False))
        line += f"; DDPM bound: {result['vlb_bits_per_dim']:.4f} +- {result['vlb_bits_per_dim_stderr']:.4f}"
        line += " (learned variance)" if result["vlb_learned_variance"] else ""
    print(f"{line} (n={len(data)}, {nfe} network evaluations)")
    if args.out:
        from difflab.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2))
    return 0
