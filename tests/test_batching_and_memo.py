"""Batching and caching while sampling: many classes drawn in one network call per step keep each sample's seed (the
same sample as drawn alone), and frozen text encodings of recent prompts are kept in memory (an LRU)."""

from __future__ import annotations

import torch

import difflab
from difflab.text.base import TextEncoding
from difflab.text.memo import PromptMemo


def test_a_batch_of_classes_is_one_call_per_step_and_keeps_each_seed(tmp_path):
    data = difflab.load_dataset("moons")
    run = difflab.train(difflab.run_config(data, conditional=True, steps=20), tmp_path / "run", progress=False)
    pipe = difflab.load(run)
    calls = []
    pipe.denoiser.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    labels = torch.tensor([0, 1, 1, 0, 1])
    together = pipe.sample(seeds=[5, 6, 7, 8, 9], cond={"class_label": labels}, sampler="ddim", steps=10)
    assert calls == [5] * 10  # one call of the whole batch per step
    for i, seed in enumerate([5, 6, 7, 8, 9]):
        alone = pipe.sample(seeds=[seed], cond={"class_label": labels[i : i + 1]}, sampler="ddim", steps=10)
        assert torch.allclose(alone[0], together[i], atol=1e-5)
    assert not torch.allclose(together[1], together[2], atol=1e-3)  # same class, other seed: another sample


class CountingEncoder:
    """A stand-in frozen encoder: a prompt's rows are a function of its text; `seen` lists what it encoded."""

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, prompts: list[str]) -> TextEncoding:
        self.seen += prompts
        codes = torch.tensor([[float(len(p)), float(sum(map(ord, p)))] for p in prompts])
        embed = codes[:, None, :].expand(-1, 3, -1).clone()
        return TextEncoding(embed, torch.tensor([[True, True, False]] * len(prompts)), codes * 2)


def test_the_prompt_memo_encodes_each_recent_prompt_once_and_forgets_the_oldest():
    encoder = CountingEncoder()
    memo = PromptMemo(lambda: encoder, size=2)
    first = memo.encode(["a red circle", "a blue square"])
    again = memo.encode(["a blue square", "a red circle", "a blue square"])
    assert encoder.seen == ["a red circle", "a blue square"]  # the second call encoded nothing
    direct = CountingEncoder().encode(["a blue square", "a red circle", "a blue square"])
    for got, want in zip(again, direct, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(first.pooled, CountingEncoder().encode(["a red circle", "a blue square"]).pooled)
    memo.encode(["a green cross"])  # the least recently used ("a red circle": blue was used last) leaves
    memo.encode(["a red circle", "a blue square"])
    assert encoder.seen == ["a red circle", "a blue square", "a green cross", "a red circle"]
    assert memo.encoded == 4 and list(memo.rows) == ["a red circle", "a blue square"]


def test_a_batch_of_prompts_is_one_call_per_step_and_keeps_each_seed(text_run):
    pipe = difflab.load(text_run)
    calls = []
    pipe.denoiser.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    prompts = ["a red circle", "a blue square", "a red circle", "a white cross left of a blue square"]
    seeds = [5, 5, 9, 2]  # the same seed with another prompt, the same prompt with another seed
    settings = {"sampler": "ddim", "steps": 4, "guidance": 5.0}
    together = pipe.sample(seeds=seeds, prompt=prompts, **settings)
    assert calls == [2 * 4] * 4  # one call per step: the 4 prompts and their 4 null captions (guidance)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = pipe.sample(seeds=[seed], prompt=[prompt], **settings)
        assert torch.allclose(alone[0], together[i], atol=1e-5)  # measured: at most 2.4e-7 apart
    assert not torch.allclose(together[0], together[1], atol=1e-5)  # the same seed, another prompt: 7e-4 apart
