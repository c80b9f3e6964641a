"""The Python API: difflab.load -> Pipeline.sample with per-sample seeds, sampler aliases, conditions, guidance and
refusals; difflab.run_config / difflab.train; and the README's Python example, run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import difflab
from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.guidance import ClassifierFreeGuidance
from difflab.guidance.thresholding import Thresholding

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """A class-conditional EDM MLP on the labelled moons, 150 steps (a few seconds): enough for exact API checks."""
    data = difflab.load_dataset("moons")
    config = difflab.run_config(data, process="edm", conditional=True, steps=150, seed=3)
    return difflab.train(config, tmp_path_factory.mktemp("moons") / "run", data=data, progress=False)


def test_train_returns_the_run_folder_and_load_rebuilds_it(moons_run):
    pipe = difflab.load(moons_run)
    assert (moons_run / "config.json").is_file() and (moons_run / "loss.png").is_file()
    assert pipe.step == 150 and pipe.formulation.name == "edm" and pipe.accepts == {"class_label"}
    assert pipe.num_classes == 2 and pipe.kernel.is_gaussian and "edm" in repr(pipe)
    assert difflab.load(pipe.checkpoint / "ema.safetensors").step == 150  # a weights file works too


def test_sample_matches_the_low_level_api_and_seeds_are_per_sample(moons_run):
    pipe = difflab.load(moons_run)
    labels = torch.tensor([0, 1, 1, 0])
    got = pipe.sample(4, seed=10, sampler="heun", steps=8, cond={"class_label": labels}, guidance=2.0)
    guided = Thresholding(ClassifierFreeGuidance(pipe.denoiser, 2.0), pipe.data_range)  # images: x0 clipped by default
    wanted = generate(guided, (2,), pipe.sigmas(8), [10, 11, 12, 13], sampler="heun",
                      cond={"class_label": labels})  # fmt: skip
    torch.testing.assert_close(got, wanted, rtol=0, atol=0)
    alone = pipe.sample(seeds=[12], sampler="heun", steps=8, cond={"class_label": 1}, guidance=2.0)
    torch.testing.assert_close(alone[0], got[2], rtol=1e-5, atol=1e-5)


def test_aliases_scalar_conditions_and_guidance_one(moons_run):
    pipe = difflab.load(moons_run)
    a1111 = pipe.sample(6, sampler="DPM++ 2M Karras", steps=6)
    plain = pipe.sample(6, sampler="dpmpp_2m", steps=6, grid="karras")
    torch.testing.assert_close(a1111, plain, rtol=0, atol=0)
    # CFG with w = 1 is the conditional model itself; a scalar label is repeated for every sample
    conditional = pipe.sample(6, sampler="euler", steps=6, cond={"class_label": 1})
    torch.testing.assert_close(pipe.sample(6, sampler="euler", steps=6, cond={"class_label": 1}, guidance=1.0),
                               conditional, rtol=0, atol=0)  # fmt: skip


def test_refusals_are_one_line_errors(moons_run):
    pipe = difflab.load(moons_run)
    with pytest.raises(DifflabError, match="not trained on image_embed; it takes class_label"):
        pipe.sample(2, cond={"image_embed": torch.zeros(1, 4)})
    with pytest.raises(DifflabError, match=r"class labels must lie in 0\.\.1"):
        pipe.sample(2, cond={"class_label": 5})
    with pytest.raises(DifflabError, match="--guidance needs --class"):
        pipe.sample(2, guidance=2.0)
    with pytest.raises(DifflabError, match="unknown sampler 'warp'"):
        pipe.sample(2, sampler="warp")
    with pytest.raises(DifflabError, match="makes points, not images"):
        pipe.to_pil(pipe.sample(2))
    with pytest.raises(DifflabError, match="cond 'class_label' holds 3 rows for 2 samples"):
        pipe.sample(2, cond={"class_label": [0, 1, 1]})


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python section, executed as written (training budget cut to 3 steps: the example must run, not
    draw well, and each step of the digits U-Net at batch 128 costs about half a second of a busy core)."""
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no Python example"
    code = block.group(1)
    assert "difflab.load(" in code and "pipe.sample(" in code and "to_pil" in code
    code, cut = re.subn(r"steps=\d{3,}", "steps=3", code)
    assert cut == 1, "the README example's training budget was not found"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (16, 1, 8, 8)
    saved = next(tmp_path.glob("*.png"))
    from PIL import Image

    with Image.open(saved) as image:
        assert image.size == (8, 8) and image.mode == "L"
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).flatten()
    expected = ((images[0].clamp(-1, 1) + 1) * 127.5).round().flatten()
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1.0)


def test_a_negative_condition_is_cfg_with_that_branch(moons_run):
    pipe = difflab.load(moons_run)
    got = pipe.sample(4, seed=5, sampler="heun", steps=6, cond={"class_label": 1}, guidance=3.0,
                      negative_cond={"class_label": 0})  # fmt: skip
    negative = {"class_label": torch.tensor([0])}
    guided = Thresholding(ClassifierFreeGuidance(pipe.denoiser, 3.0, negative=negative), pipe.data_range)
    ones = torch.ones(4, dtype=torch.long)
    wanted = generate(guided, (2,), pipe.sigmas(6), [5, 6, 7, 8], sampler="heun", cond={"class_label": ones})
    torch.testing.assert_close(got, wanted, rtol=0, atol=0)


def test_classifier_labels_are_checked_against_the_classifier(tmp_path):
    """An unconditional model guided by a 2-class classifier: labels outside 0..1 are a one-line error, not an
    index error inside the classifier."""
    from difflab.guidance.classifier import ClassifierConfig, build_classifier

    data = difflab.load_dataset("moons")
    run = difflab.train(difflab.run_config(data, process="edm", steps=5), tmp_path / "run", data=data, progress=False)
    pipe = difflab.load(run)
    classifier = build_classifier(ClassifierConfig("moons", "points", (2,), 2, 16, 1))
    assert pipe.sample(2, steps=3, cond={"class_label": 1}, classifier=classifier).shape == (2, 2)
    with pytest.raises(DifflabError, match=r"class labels must lie in 0\.\.1"):
        pipe.sample(2, steps=3, cond={"class_label": 5}, classifier=classifier)
    with pytest.raises(DifflabError, match="not trained on class_label"):
        pipe.sample(2, steps=3, cond={"class_label": 1})  # without the classifier the label has no taker


def test_a_weights_file_named_on_purpose_is_the_one_loaded(moons_run):
    ckpt = difflab.load(moons_run).checkpoint
    raw, ema = difflab.load(ckpt / "model.safetensors"), difflab.load(ckpt / "ema.safetensors")
    assert raw.weights.name == "model.safetensors" and ema.weights.name == "ema.safetensors"
    assert not torch.equal(raw.sample(3, steps=3), ema.sample(3, steps=3))
    assert difflab.load(ckpt, use_ema=False).weights.name == "model.safetensors"


def test_sample_passes_every_keyword_of_prepare_on_and_nothing_else():
    """`sample` splits its keywords into prepare's (CONDITION_KEYWORDS) and the sampler's options: the list must be
    exactly prepare's parameters, or a new one would reach the sampler as an unknown option."""
    import inspect

    from difflab.pipeline import CONDITION_KEYWORDS, Pipeline

    assert set(CONDITION_KEYWORDS) == set(inspect.signature(Pipeline.prepare).parameters) - {"self", "n"}
