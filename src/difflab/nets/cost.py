"""What a network costs: its parameter count and the floating-point operations of one forward pass per sample, for any
backbone (U-Net, DiT, MLP, with a scratch text encoder in front or not).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix products (linear layers,
convolutions, batched matmuls, attention) at 2 FLOPs per multiply-add and ignores element-wise work (norms,
activations, additions), a few per cent of a transformer's or U-Net's. The DiT paper's "Gflops" (Peebles & Xie 2023,
Table 4: DiT-XL/2 118.6) are fvcore's counts, which count one multiply-add as one: half of ours. PyTorch's counter
has no formula for the fused attention kernel it runs on CPU (`_scaled_dot_product_flash_attention_for_cpu`), so
the CUDA kernels' formula is registered for it here: attention costs the same wherever it runs.

The forward pass is traced on the CPU with one sample and full-size conditioning: a class label, the text context of
the model's text encoder (its full token length, every token real: the most a caption costs) and, for an upsampler
or an inpainting model, its image inputs (absent ones are zeros of the same size, so the count is the same)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # QK^T and (softmax)V, as for the CUDA kernels


_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass(frozen=True)
class NetworkCost:
    parameters: int  # every parameter of the network (a scratch text encoder's included)
    flops: int  # floating-point operations of one forward pass for one sample (multiply-add = 2)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def parameter_count(net: nn.Module) -> int:
    """The number of parameter values (shared tensors once)."""
    return sum(p.numel() for p in net.parameters())


def forward_flops(net: nn.Module, sample_shape: tuple[int, ...], cond: dict[str, torch.Tensor] | None = None,
                  batch: int = 1) -> int:  # fmt: skip
    """FLOPs of one forward pass F(x, c_noise, cond) per sample, on a batch of `batch` zero samples of `sample_shape`
    (cond's tensors have that batch size) at c_noise 0, in evaluation mode (dropout off) and without gradients."""
    was_training = net.training
    x, c_noise = torch.zeros(batch, *sample_shape), torch.zeros(batch)
    try:
        net.eval()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            net(x, c_noise, cond)
    finally:
        net.train(was_training)
    return counter.get_total_flops() // batch


def example_cond(model: Any, batch: int = 1) -> dict[str, torch.Tensor] | None:
    """Full-size conditioning for the network of `model` (a `difflab.nets.ModelConfig`): class label 0 for a
    conditional network; for a text model a caption as long as its encoder reads with every token real (scratch
    encoder: token ids; frozen encoder: text_embed, text_mask, text_pooled of its sizes); None if it takes neither."""
    from difflab.text.conditioned import FrozenTextConfig, TextConfig

    cond: dict[str, torch.Tensor] = {}
    if model.num_classes:
        cond["class_label"] = torch.zeros(batch, dtype=torch.long)
    text = model.text
    if isinstance(text, TextConfig):  # ids 2.. are words (0 = padding, 1 = end): a caption filling the context
        cond["text_tokens"] = torch.full((batch, text.max_length), 2, dtype=torch.long)
    elif isinstance(text, FrozenTextConfig):
        length = text.max_length
        cond["text_embed"] = torch.zeros(batch, length, text.dim)
        cond["text_mask"] = torch.ones(batch, length, dtype=torch.bool)
        cond["text_pooled"] = torch.zeros(batch, text.pooled_dim)
    return cond or None


def network_cost(model: Any, sample_shape: tuple[int, ...]) -> NetworkCost:
    """The parameter count and forward FLOPs per sample of the network `model` (a `difflab.nets.ModelConfig`)
    describes, for samples of `sample_shape`, with `example_cond`'s conditioning. Builds the network on the CPU."""
    from difflab.nets import build_network

    net = build_network(model)
    return NetworkCost(parameter_count(net), forward_flops(net, tuple(sample_shape), example_cond(model)))


__all__ = ["NetworkCost", "example_cond", "forward_flops", "network_cost", "parameter_count"]
