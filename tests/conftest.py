"""Shared fixtures: a private cache, one torch thread, and the closed-form oracles standing in for networks."""

from __future__ import annotations

import os

# One BLAS thread for numpy and scipy (their OpenBLAS reads this when it loads, which is here, before the first import
# of numpy), as torch gets one intra-op thread below: on a busy 2-core machine a second BLAS thread mostly spins
# waiting for the first. Measured there: the eigendecompositions of one 2048-d Frechet distance 9-41 s with two
# threads, 6-7 s with one; test_evaluate, test_inception and test_metrics 95-118 s and 58-64 s. Set
# OPENBLAS_NUM_THREADS to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from difflab.cli.main import main
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser

__all__ = [
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "assert_exact_resume",
    "assert_one_line_error",
    "randomised",
    "run_cli",
]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the digits classifier and reference statistics that tests create out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("difflab-cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op torch thread for the whole suite: the tensors are tiny, and on a busy 2-core machine two threads
    mostly wait for each other (a Heun test took 12 s instead of 0.9 s, a small network trained 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_THREADS", "1")  # what the CLI's --threads defaults to in-process
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def moons_ddpm_run(tmp_path_factory, _one_thread):
    """The tiny MLP trained on moons as a discrete DDPM (v-prediction) through the CLI, 2000 steps (about 40 s on one
    core), shared by every module that samples or evaluates a trained toy model (test_cli, test_processes,
    test_evaluate). Tests read it and must never write into it. DDIM (50 steps, 2000 samples) must reach the
    real-vs-real floor (threshold 0.045): with v-prediction SW2 0.031 and 0.034 at 2000 steps with seeds 0 and 1
    (ddpm, 100 steps: 0.031, 0.032; at 2500 steps ddim 0.028, 0.032), where the eps-prediction needed 4000 steps
    (at 3000 still 0.060 and 0.107; at 2000 with lr 2e-3 0.111). `difflab eval` (ddpm, 50 steps, 500 samples) of the
    2000-step runs: precision 0.73, 0.73, recall 0.94, 0.94, FID 0.0035, 0.0034, SW2 0.054, 0.053."""
    out = tmp_path_factory.mktemp("moons_ddpm")
    argv = ["train", "--data", "moons", "--prediction", "v", "--out", str(out), "--steps", "2000", "--no-progress"]
    assert main(argv) == 0
    before = _listing(out)
    yield out
    assert _listing(out) == before, "a test wrote into the shared moons run"


@pytest.fixture(scope="session")
def edm_run(tmp_path_factory):
    """A tiny MLP trained on moons with the EDM process, 600 steps, shared by test_processes and test_distill (its
    teacher). Measured (seeds 0, 1, 2): heun 20 steps SW2 0.025, 0.029, 0.029 against a threshold of 0.047; every
    sampler at most 0.073, 0.080, 0.077 against 0.12 with 500 samples (0.088, 0.095, 0.093 with the 300 the test
    draws). At 1000 steps 0.025, 0.022, 0.028 and 0.074, 0.075, 0.074; at 2000 steps no better (0.025; 0.078)."""
    folder = tmp_path_factory.mktemp("edm")
    argv = ["train", "--data", "moons", "--process", "edm", "--out", str(folder), "--steps", "600", "--no-progress"]
    assert main(argv) == 0
    return folder


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="session")
def digits_classifier_cache(_private_cache, _one_thread):
    """The digits classifier in the session's private cache (DIFFLAB_CACHE), trained once per session (about 20 s):
    the digits demo, `difflab eval --data digits` and the quality reports read the same file. (cache folder, model)."""
    from difflab.eval.digits_classifier import default_cache_dir, load_digits_classifier

    return default_cache_dir(), load_digits_classifier()


def run_cli(capsys, *argv):
    """Run `difflab ARGV` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """The CLI's contract for user errors: exit code 2, one line on stderr, no traceback, naming the fragments."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


TEXT_RUN_SCENES = 1000  # the scenes text_run trains on


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A text model on the 16x16 shapes (scratch encoder) trained 6 steps: it exercises every path of text to image,
    not drawing well. Tests only read it. It trains on the first TEXT_RUN_SCENES scenes of the training split, not the
    20,000 of `difflab train --data shapes` (rendering those took 8 of the fixture's 9 s; 6 steps of batch 8 see 48):
    their captions give the tokenizer of the whole set (every word of the world, the longest caption) from 500 on."""
    import difflab.data

    out = tmp_path_factory.mktemp("text") / "run"
    real = difflab.data.load_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(difflab.data, "load_dataset", lambda *a, **k: real(*a, **(k | {"size": TEXT_RUN_SCENES})))
        code = main(["train", "--data", "shapes", "--resolution", "16", "--text-encoder", "scratch", "--steps", "6",
                     "--batch-size", "8", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def assert_exact_resume(make, data, tmp_path, changed: str) -> None:
    """make(steps) -> RunConfig on `data`: 6 steps straight equal 3 + resume + 3, bit for bit (checkpoints every 3);
    the weight `changed` of the half-way checkpoint differs from the end (the test is not vacuous)."""
    import difflab
    from difflab.training.checkpoint import latest_checkpoint, list_checkpoints

    straight = difflab.train(make(6), tmp_path / "straight", data=data, progress=False)
    difflab.train(make(3), tmp_path / "split", data=data, progress=False)
    split = difflab.train(None, tmp_path / "split", data=data, resume=True, steps=6, progress=False)
    a, b = (difflab.load(latest_checkpoint(r), use_ema=False).denoiser.net.state_dict() for r in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    half = difflab.load(list_checkpoints(split)[0], use_ema=False).denoiser.net.state_dict()
    assert not torch.equal(half[changed], b[changed])


AE_STEPS = 200  # the digits autoencoder's training steps


@pytest.fixture(scope="session")
def digits_autoencoder(tmp_path_factory):
    """f = 2, C = 2 on the 8x8 digits, width 16, 200 steps with the discriminator from step 133 (about 20 s). Measured
    (seed 0): reconstruction PSNR 17.5 dB on the training images; the test split's reconstructions score digits FD
    54 (floor 19, real 0; at 300 steps 17). Tests only read it (test_autoencoder, test_latent)."""
    out = tmp_path_factory.mktemp("ae") / "ae"
    code = main(["train-autoencoder", "--data", "digits", "--factor", "2", "--latent-channels", "2", "--width", "16",
                 "--steps", str(AE_STEPS), "--disc-weight", "0.5", "--disc-start", str(AE_STEPS * 2 // 3),
                 "--lr", "5e-4", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture
def small_shapes(monkeypatch):
    """`load_dataset("shapes", ...)` cut to its first 32 scenes (the same scenes and captions at every resolution:
    rendering 20,000 takes seconds); returns them at 16x16."""
    import difflab.data

    real = difflab.data.load_dataset
    monkeypatch.setattr(difflab.data, "load_dataset", lambda *a, **k: real(*a, **(k | {"size": 32})))
    return real("shapes", resolution=16, size=32)


def tiny_clip_tokenizer(src, words):
    """A CLIP BPE tokenizer (context 16) of the 26 letters and merges that build each of `words`, saved in folder
    `src`: (tokenizer, vocab). No download: tests build their tiny CLIP text models on it."""
    import json

    import transformers

    vocab, merges = {}, []
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    for word in words:  # merges that build each word from its letters
        parts = [*word[:-1], word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            merges.append(f"{merged} {part}")
            merged += part
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(str(src), model_max_length=16), vocab


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    """`net` in eval mode with its zero-initialised convolutions made random (seed 0), so that its output depends on
    every layer."""
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
    return net.eval()


@pytest.fixture(scope="session")
def digits_class_run(tmp_path_factory):
    """A class-conditional digits model (8x8, 10 classes) trained 20 steps: the model the serve tests offer."""
    out = tmp_path_factory.mktemp("digits_class") / "run"
    assert main(["train", "--data", "digits", "--conditional", "--steps", "20", "--batch-size", "32",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    return out
