"""`difflab demo --process pfgm`: the field lines of the data's exact Poisson field end uniformly on a large hemisphere
(and those of a wrong field do not), and the demo writes its figures."""

import functools
import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from difflab.cli.main import main
from difflab.data.toys import sample_toy
from difflab.kernels import GaussianKernel
from difflab.viz.pfgm import field_lines, uniformity

CHARGES = sample_toy("heart", 60, seed=0)
RADIUS = 30.0  # far enough that the ends' deviation from uniform, second order in (data size / radius), is invisible


class WrongPower:
    """The Poisson field's weights with one power too many, ||(x, z) - (y, 0)||^-4 instead of ^-3: not a field whose
    flux is conserved in 3-D."""

    name = "wrong-power"

    def log_kernel(self, sq_dist: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
        return -0.5 * (dim + 2) * torch.log(sq_dist + sigma**2)


@pytest.mark.parametrize("start_height", [None, 0.1], ids=["from-the-charges", "from-the-plane-z=0.1"])
def test_field_lines_of_the_exact_field_end_uniformly_on_the_hemisphere(start_height):
    lines = field_lines(CHARGES, 300, RADIUS, start_height=start_height, seed=0)
    stats = uniformity(lines)  # KS of cos(polar angle) against U[floor, 1] and of the azimuth against U[0, 1]
    assert stats["cos_polar_p"] > 1e-3 and stats["azimuth_p"] > 1e-3, stats


@pytest.mark.parametrize("kernel", [WrongPower(), GaussianKernel()], ids=["weights-power-4", "diffusion-gaussian"])
def test_the_lines_of_a_wrong_field_do_not_end_uniformly(kernel):
    stats = uniformity(field_lines(CHARGES, 300, RADIUS, seed=0, kernel=kernel))
    assert stats["cos_polar_p"] < 1e-6, stats


def test_field_lines_run_from_the_charges_up_to_the_hemisphere():
    start_radius = 1e-3
    lines = field_lines(CHARGES, 100, 4.0, start_radius=start_radius, seed=1)
    charges = np.concatenate([CHARGES.double().numpy(), np.zeros((len(CHARGES), 1))], axis=1)
    for path, end in zip(lines.paths, lines.ends, strict=True):
        assert np.linalg.norm(charges - path[0], axis=1).min() == pytest.approx(start_radius, rel=1e-6)
        assert np.all(np.diff(path[:, 2]) > 0), "z grows along a field line of charges on the plane"
        assert np.all(np.linalg.norm(path, axis=1) <= 4.0 + 1e-9) and np.array_equal(path[-1], end)
    assert np.allclose(np.linalg.norm(lines.ends, axis=1), 4.0, rtol=0, atol=1e-9)
    near = lines.clipped(2.0)
    assert np.allclose(np.linalg.norm(near.ends, axis=1), 2.0, rtol=0, atol=1e-9)
    assert all(np.array_equal(a[:-1], b[: len(a) - 1]) for a, b in zip(near.paths, lines.paths, strict=True))


@pytest.mark.slow
def test_pfgm_demo_writes_the_field_figures_and_the_backward_flow(tmp_path, capsys, monkeypatch):
    """What the demo writes, with a 6-frame animation held for 2 frames: drawing the 30 + 8 frames of the demo's own
    3-D GIF took 23 of this test's 41 s. The field-line uniformity it reports is the demo's own (500 charges, 1000
    lines)."""
    import difflab.cli.demo as demo
    import difflab.viz.pfgm as viz

    monkeypatch.setattr(demo, "sample_with_flow", functools.partial(viz.sample_with_flow, frames=6))
    monkeypatch.setattr(demo, "save_backward_flow_gif", functools.partial(viz.save_backward_flow_gif, fps=2))
    code = main(["demo", "--data", "heart", "--process", "pfgm", "--steps", "100", "--out", str(tmp_path),
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    names = ("poisson_field.png", "hemisphere.png", "backward_flow.gif", "backward_flow_strip.png", "samples.png")
    for name in (*names, "metrics.json"):
        assert (tmp_path / name).stat().st_size > 300, name
        assert str(tmp_path / name) in out, name
    with Image.open(tmp_path / "backward_flow.gif") as gif:
        assert gif.format == "GIF" and gif.is_animated and gif.n_frames > 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["process"] == "pfgm" and metrics["data"] == "heart" and metrics["train_steps"] == 100
    assert metrics["sampler"]["swd"] > 0 and metrics["sampler"]["n"] == 1000
    assert metrics["field_lines"]["cos_polar_p"] > 1e-3, metrics["field_lines"]
    assert "KS distance" in out and "sliced W2" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--process", "pfgm", "--data", "nonsense"], "the pfgm demo trains on moons, swissroll, 8gaussians"),
        (["--process", "pfgm", "--data", "digits"], "the pfgm demo trains on moons, swissroll, 8gaussians"),
        (["--data", "heart"], "--process pfgm"),
        (["--process", "vp"], "unknown --process"),
    ],
)
def test_unsupported_demo_combinations_are_one_line_errors(argv, fragment, tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", *argv, "--out", tmp_path)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()
