"""`difflab eval` and the evaluation plumbing: extractors, cached reference statistics, reports."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli.evaluate import parse_sweep
from difflab.cli.main import main
from difflab.data import load_digits_split
from difflab.errors import DifflabError
from difflab.eval.evaluate import score_samples
from difflab.eval.extractors import PointFeatures, RandomCNNFeatures, make_extractor
from difflab.eval.frechet import feature_statistics, frechet_distance_between
from difflab.eval.reference import ReferenceStats, reference_statistics
from difflab.eval.report import write_report


@pytest.fixture
def toy_run(moons_ddpm_run):
    """The session's tiny MLP trained 2000 steps on moons, v-prediction (tests/conftest.py): read it, never write."""
    return moons_ddpm_run


def test_eval_of_a_checkpoint_writes_json_and_report(toy_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--ckpt", str(toy_run), "--sampler", "ddpm", "--steps", "50", "--n", "500", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    row = result["rows"][0]
    assert row["nfe"] == 50 and row["n"] == 500 and row["extractor"] == "identity (raw points)"
    # an untrained model scores precision ~0, FID > 100 (see the toy quality test in test_cli.py)
    assert row["precision"] > 0.5 and row["recall"] > 0.8 and row["fid"] < 0.05 and row["sw2"] < 0.1
    report = (out / "report.md").read_text()
    assert "identity (raw points)" in report and "seed 0" in report and "ddpm" in report


def test_sweep_gives_one_row_per_nfe_and_quality_improves_with_nfe(toy_run, tmp_path):
    out = tmp_path / "sweep"
    code = main(["eval", "--ckpt", str(toy_run), "--sampler", "ddim", "--sweep", "nfe=2,5,50", "--n", "500",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["nfe"] for r in rows] == [2, 5, 50]
    assert rows[-1]["fid"] < rows[0]["fid"] and rows[-1]["sw2"] < rows[0]["sw2"]
    assert (out / "quality_vs_nfe.png").stat().st_size > 1000


def _write_pngs(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = ((img[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(folder / f"{i:04d}.png")


def test_eval_of_an_image_folder_against_the_digits(tmp_path, capsys):
    test_digits, _ = load_digits_split("test")
    _write_pngs(tmp_path / "real", test_digits)
    noise = torch.rand(450, 1, 8, 8) * 2 - 1
    _write_pngs(tmp_path / "noise", noise)
    figures = {}
    for name in ("real", "noise"):
        code = main(
            ["eval", "--images", str(tmp_path / name), "--data", "digits", "--out", str(tmp_path / f"e_{name}")]
        )
        assert code == 0
        figures[name] = json.loads((tmp_path / f"e_{name}" / "eval.json").read_text())["rows"][0]
    real, noisy = figures["real"], figures["noise"]
    assert real["extractor"].startswith("digits-classifier")
    assert real["fid"] < 1.0 and real["precision"] > 0.95 and real["recall"] > 0.95  # the test split itself
    assert noisy["fid"] > 100 * max(real["fid"], 0.1) and noisy["precision"] < 0.2
    assert real["inception_score_mean"] > 8.0 > noisy["inception_score_mean"]  # 10 balanced, confident classes


def test_reference_statistics_are_cached_per_extractor(tmp_path, monkeypatch):
    ext = PointFeatures()
    first = reference_statistics("moons", (2,), ext, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ref-moons-test-2-*.npz"))) == 1
    monkeypatch.setattr(ext, "features", lambda x: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = reference_statistics("moons", (2,), ext, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.mu, again.mu)
    np.testing.assert_allclose(first.mu, first.features.mean(0), atol=1e-6)
    reference_statistics("moons", (2,), _Scaled(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ref-moons-test-2-*.npz"))) == 2


class _Scaled(PointFeatures):
    name = "scaled points"

    def features(self, images):
        return 2 * images.float()


def test_random_cnn_features_are_fixed_and_tell_distributions_apart():
    """300 images a set: Frechet distance 0.12 between two smooth sets and 1.68 from smooth to noise, a ratio of 14
    (seeds 0 and 1; 25 with 600 images, for twice the time)."""
    g = torch.Generator().manual_seed(0)
    a, b = RandomCNNFeatures(3), RandomCNNFeatures(3)
    smooth = torch.nn.functional.interpolate(torch.rand(300, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    smooth2 = torch.nn.functional.interpolate(torch.rand(300, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    noise = torch.rand(300, 3, 16, 16, generator=g) * 2 - 1
    features = a.features(smooth)  # once, not four times: each pass of the random CNN costs seconds on one core
    torch.testing.assert_close(features, b.features(smooth), rtol=0, atol=0)
    assert features.shape == (300, 512)
    same = frechet_distance_between(features, a.features(smooth2))
    different = frechet_distance_between(features, a.features(noise))
    assert different > 5 * same


def test_bad_eval_inputs(tmp_path, capsys):
    with pytest.raises(DifflabError, match="nfe=5,10,20,50"):
        parse_sweep("steps=5,10")
    assert parse_sweep("nfe=20,5,5") == [5, 20]
    for argv, fragment in (
        (["eval", "--sampler", "ddim"], "exactly one of --ckpt"),
        (["eval", "--images", str(tmp_path)], "--images needs --data"),
        (["eval", "--images", str(tmp_path), "--data", "digits"], "no readable"),
        (["eval", "--ckpt", str(tmp_path), "--sampler", "nope"], "unknown sampler"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_eval_with_inception_weights_names_the_extractor_and_reports_is(tmp_path, capsys):
    from difflab.eval.inception import FIDInceptionV3, save_inception_safetensors

    torch.manual_seed(0)
    weights = save_inception_safetensors(FIDInceptionV3().eval(), tmp_path / "inception.safetensors")
    rng = np.random.default_rng(0)
    for name in ("real", "fake"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    code = main(["eval", "--images", str(tmp_path / "fake"), "--data", str(tmp_path / "real"), "--resolution", "16",
                 "--inception-weights", str(weights), "--out", str(tmp_path / "e"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    row = json.loads((tmp_path / "e" / "eval.json").read_text())["rows"][0]
    assert row["extractor"].startswith("inception-v3-fid") and row["comparable_with_papers"] is True
    assert row["n"] == 6 and row["n_reference"] == 6 and 1.0 <= row["inception_score_mean"] <= 1008
    assert "not comparable" not in (tmp_path / "e" / "report.md").read_text()
    code = main(["eval", "--images", str(tmp_path / "fake"), "--data", str(tmp_path / "real"),
                 "--inception-weights", str(tmp_path / "missing.pth")])  # fmt: skip
    assert code == 2 and "--inception-weights" in capsys.readouterr().err


def test_nll_command_reports_bits_per_dim(toy_run, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert main(["nll", "--ckpt", str(toy_run), "--n", "100", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["divergence"] == "auto" and result["dequantized"] is False and result["nfe"] > 0
    # a uniform density on [-1, 1]^2 has 1 bit/dim, a Gaussian fit of moons about 0.68: the model must beat both.
    # Measured with 100 points: -0.23 +- 0.046 and -0.22 +- 0.050 bits/dim (seeds 0, 1; the fixture's 2000 v-prediction
    # steps; its earlier 4000 eps steps gave -0.45 +- 0.031)
    assert result["bits_per_dim"] < 0.3 and result["bits_per_dim_stderr"] < 0.1
    assert main(["nll", "--ckpt", str(toy_run), "--n", "8", "--vlb"]) == 2
    assert "--vlb needs a discrete (ddpm) model of image data" in capsys.readouterr().err


class _Spy:
    """Wraps an extractor and keeps what reaches it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.name, self.comparable = inner.name, inner.comparable

    def features(self, images):
        self.seen.append(images.clone())
        return self.inner.features(images)

    def probabilities(self, images):
        return self.inner.probabilities(images)


def _reference(extractor, data):
    feats = extractor.features(data).numpy()
    mu, sigma = feature_statistics(feats)
    return ReferenceStats(feats, mu, sigma, "test reference")


def _levels(n, seed):
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_score_samples_quantises_images_to_8_bits_before_extraction(tmp_path):
    levels = _levels(40, 0)
    on_grid = levels.float() / 255 * 2 - 1
    # between the levels: within 0.4 of a level (edge levels also reach below -1 and above 1, clamped back)
    offsets = (torch.rand(on_grid.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8 * (2 / 255)
    between = on_grid + offsets
    ext = RandomCNNFeatures(1, progress=False)
    assert not torch.equal(ext.features(between), ext.features(on_grid))  # unquantised, the features differ
    reference = _reference(ext, _levels(30, 2).float() / 255 * 2 - 1)
    spy = _Spy(ext)
    got = score_samples(between, reference, spy, kid_subsets=5)
    want = score_samples(on_grid, reference, ext, kid_subsets=5)
    assert got == want and got["fid"] > 0  # every metric exactly as for the quantised samples
    # what reached the extractor is round((x + 1) / 2 * 255) / 255 * 2 - 1, computed here in float64
    x = between.double().numpy()
    expected = np.clip(np.round((np.clip(x, -1, 1) + 1) / 2 * 255), 0, 255) / 255 * 2 - 1
    np.testing.assert_allclose(spy.seen[0].double().numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.round((expected + 1) / 2 * 255), levels.numpy())
    assert got["quantised_8bit"] is True
    # KID uses min(kid_subset_size, n, n_reference) rows per subset: min(1000, 40, 30)
    assert got["kid_subsets"] == 5 and got["kid_subset_size"] == 30
    report = (write_report({"settings": {"source": "test"}, "rows": [got]}, tmp_path / "r")[1]).read_text()
    assert "quantised to 8 bits (256 levels per channel" in report and "before feature extraction" in report
    assert "mean and std over 5 random subsets of 30 samples per set" in report


def test_score_samples_leaves_points_unquantised(tmp_path):
    g = torch.Generator().manual_seed(0)
    points, ref_points = torch.randn(50, 2, generator=g) * 0.3, torch.randn(60, 2, generator=g) * 0.3
    spy = _Spy(PointFeatures())
    out = score_samples(points, _reference(PointFeatures(), ref_points), spy, kid_subsets=3, kid_subset_size=7)
    assert torch.equal(spy.seen[0], points)  # off the 8-bit grid and passed on as they are
    assert out["quantised_8bit"] is False and out["kid_subsets"] == 3 and out["kid_subset_size"] == 7
    report = (write_report({"settings": {"source": "test"}, "rows": [out]}, tmp_path / "r")[1]).read_text()
    assert "not quantised" in report and "quantised to 8 bits" not in report
    assert "3 random subsets of 7 samples per set" in report


def test_feature_extraction_shows_a_progress_bar_over_several_batches(capsys):
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shown = RandomCNNFeatures(1, batch_size=4).features(images)  # progress on by default: 3 batches
    err = capsys.readouterr().err
    assert "random-cnn features" in err and "3/3" in err
    hidden = RandomCNNFeatures(1, batch_size=4, progress=False).features(images)
    assert capsys.readouterr().err == ""
    one_batch = RandomCNNFeatures(1, batch_size=16).features(images)
    assert capsys.readouterr().err == ""  # a single batch needs no bar
    torch.testing.assert_close(shown, hidden, rtol=0, atol=0)
    torch.testing.assert_close(shown, one_batch, rtol=1e-5, atol=1e-6)
    assert make_extractor("images", "folder", 1).progress is True
    assert make_extractor("images", "folder", 1, progress=False).progress is False
