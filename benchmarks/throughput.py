"""Throughput of difflab's U-Net against diffusers' UNet2DModel of matched size, measured side by side.

    python benchmarks/throughput.py [--rounds 5] [--threads 2]

Needs `pip install diffusers` (benchmark only; not a difflab dependency). Prints a markdown table of median
times per training step (forward + backward + AdamW) and per sampling call (forward, no grad), and the ratio
diffusers_time / difflab_time (> 1 means difflab is faster). Rounds alternate between the two models so that
machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from difflab.nets.unet import UNet, unet_preset

CASES = {
    # name: (preset, resolution, channels, train batch, sample batch)
    "tiny 16x16x1": ("tiny", 16, 1, 64, 256),
    "small 32x32x3": ("small", 32, 3, 32, 128),
}


def diffusers_twin(preset: str, resolution: int, channels: int):
    """A diffusers UNet2DModel with the same widths, depth, attention placement and norm groups."""
    from diffusers import UNet2DModel

    cfg = unet_preset(preset, resolution, channels)
    widths = tuple(cfg.channels * m for m in cfg.channel_mult)
    res = [resolution // 2**i for i in range(len(widths))]
    down = tuple("AttnDownBlock2D" if r in cfg.attention_resolutions else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in cfg.attention_resolutions else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=widths, down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_groups,
        attention_head_dim=widths[-1] // cfg.attention_heads,
    )  # fmt: skip


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def time_train_step(call, model, x, t, opt) -> float:
    start = time.perf_counter()
    loss = call(model, x, t).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def time_sample_call(call, model, x, t) -> float:
    start = time.perf_counter()
    call(model, x, t)
    return time.perf_counter() - start


def bench_case(name: str, rounds: int) -> dict:
    preset, res, ch, b_train, b_sample = CASES[name]
    g = torch.Generator().manual_seed(0)
    ours, theirs = UNet(unet_preset(preset, res, ch)), diffusers_twin(preset, res, ch)
    calls = {"difflab": lambda m, x, t: m(x, t), "diffusers": lambda m, x, t: m(x, t).sample}
    models = {"difflab": ours, "diffusers": theirs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    xt, tt = torch.randn(b_train, ch, res, res, generator=g), torch.randint(0, 1000, (b_train,), generator=g)
    xs, ts = torch.randn(b_sample, ch, res, res, generator=g), torch.randint(0, 1000, (b_sample,), generator=g)
    times = {k: {"train": [], "sample": []} for k in models}
    for r in range(rounds + 1):  # round 0 warms up
        for k, m in models.items():
            tr = time_train_step(calls[k], m.train(), xt, tt.float() if k == "difflab" else tt, opts[k])
            sa = time_sample_call(calls[k], m.eval(), xs, ts.float() if k == "difflab" else ts)
            if r > 0:
                times[k]["train"].append(tr)
                times[k]["sample"].append(sa)
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
    return {
        "case": name, "params_difflab": n_params(ours), "params_diffusers": n_params(theirs),
        "train_ratio": med["diffusers"]["train"] / med["difflab"]["train"],
        "sample_ratio": med["diffusers"]["sample"] / med["difflab"]["sample"],
        "train_batch": b_train, "sample_batch": b_sample,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, CPU")
    print("| case | params difflab | params diffusers | train-step ratio | sampling ratio |")
    print("|---|---|---|---|---|")
    for name in CASES:
        r = bench_case(name, args.rounds)
        print(
            f"| {r['case']} (batch {r['train_batch']}/{r['sample_batch']}) | {r['params_difflab'] / 1e6:.2f} M | "
            f"{r['params_diffusers'] / 1e6:.2f} M | {r['train_ratio']:.2f} | {r['sample_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
