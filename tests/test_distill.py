"""Distillation (`difflab distill`): progressive distillation's target by hand and a distilled toy student that beats
its teacher at the student's step count; consistency distillation from an EDM teacher (one step), exact resume of its
target network; the record of the teacher and the refusals."""

import json

import pytest
import torch
from conftest import assert_exact_resume, assert_one_line_error

import difflab
from difflab.cli.main import main
from difflab.distill.losses import ProgressiveDistillationLoss, ddim_step
from difflab.distill.run import consistency_formulation, distill, student_config, teacher_checkpoint
from difflab.errors import DifflabError
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.formulations import EDMConfig, make_formulation
from difflab.oracles import GaussianDenoiser
from difflab.training.checkpoint import latest_checkpoint
from difflab.training.trainer import read_log

MOONS = difflab.load_dataset("moons")


def quality(pipe, **kwargs) -> float:
    return sliced_wasserstein(pipe.sample(2000, seed=0, **kwargs), MOONS.data[:2000])


def test_one_student_ddim_step_on_the_progressive_target_lands_where_two_teacher_steps_do():
    teacher = GaussianDenoiser(torch.tensor([0.5, -0.2]), torch.tensor([0.3, 0.6]))
    loss = ProgressiveDistillationLoss(make_formulation(EDMConfig()), teacher, steps=4)
    x0 = torch.randn(256, 2)
    captured = {}

    def student(x, sigma, cond=None):  # returns zeros and records what it was asked
        captured.update(x=x, sigma=sigma)
        return torch.zeros_like(x)

    losses = loss(student, x0, torch.Generator().manual_seed(0))
    x, sigma = captured["x"], captured["sigma"]
    grid = loss.grid  # the teacher's 8 steps; the student's 4 are its even entries
    index = torch.searchsorted(-grid, -sigma)  # the position of each sigma in the teacher's grid
    assert bool((index % 2 == 0).all()) and set(index.tolist()) == {0, 2, 4, 6}
    mid, nxt = grid[index + 1], grid[index + 2]
    two = ddim_step(teacher, ddim_step(teacher, x, sigma, mid, None), mid, nxt, None)
    ratio = (nxt / sigma)[:, None]
    target = (two - ratio * x) / (1 - ratio)
    torch.testing.assert_close(ddim_step(lambda *a: target, x, sigma, nxt, None), two, rtol=1e-4, atol=1e-4)
    weight = sigma.pow(-2).clamp(min=1)  # truncated SNR: max(SNR, 1)
    torch.testing.assert_close(losses, weight * target.pow(2).mean(1))


def test_progressive_distillation_halves_the_steps_and_beats_the_teacher_there(moons_ddpm_run, tmp_path, capsys):
    """The teacher (the shared v-prediction DDPM) with ddim on the trailing grid: SW2 0.37, 0.25, 0.14 in 2, 4, 8
    steps. A student matches its teacher at twice its steps (one round 4 -> 2, 300 steps: 0.247); two rounds 8 -> 4
    -> 2 of 150 steps each: 0.14 in 2 steps, the teacher's 8-step quality."""
    four, student = distill(moons_ddpm_run, tmp_path / "pd", rounds=2, teacher_steps=8, steps=150, progress=False)
    assert (four, student) == (tmp_path / "pd" / "steps_4", tmp_path / "pd" / "steps_2")
    pipe = difflab.load(student)
    assert pipe.sampling_defaults() == {"sampler": "ddim", "steps": 2, "grid": "trailing"}
    config = json.loads((student / "config.json").read_text())
    ckpt, _, digest = teacher_checkpoint(four)  # the second round's teacher is the first round's student
    assert config["distill"] == {"method": "progressive", "teacher": str(ckpt), "teacher_hash": digest, "steps": 2,
                                 "sampler": "ddim", "grid": "trailing"}  # fmt: skip
    # each round anneals its learning rate linearly to 0 without warm-up, as the paper's configurations do
    assert (config["train"]["lr_schedule"], config["train"]["warmup_steps"]) == ("linear", 0)
    assert read_log(student)[-1]["lr"] < 0.02 * config["train"]["lr"]
    teacher = quality(difflab.load(moons_ddpm_run), sampler="ddim", steps=2, grid="trailing")
    assert main(["info", str(student)]) == 0
    assert "progressive distillation of" in capsys.readouterr().out
    distilled = quality(pipe)
    assert distilled < teacher / 2


@pytest.fixture
def edm_teacher(edm_run):
    """The session's EDM MLP on moons (tests/conftest.py: 600 steps, heun 20 steps SW2 0.025)."""
    return edm_run


def test_consistency_distillation_samples_in_one_step(edm_teacher, tmp_path, capsys):
    """Measured (200 steps from a 500-step teacher, target EMA 0.5; the shared teacher has 600): one step SW2 0.09
    (0.34 with the paper's 0.95, which needs ~800 steps here: 0.03); the teacher's one Euler step (its denoiser at
    sigma_max, about the data mean) 0.43, its heun in 10 steps 0.055."""
    student = tmp_path / "cd"
    argv = ["distill", "--teacher", edm_teacher, "--method", "consistency", "--steps", 200, "--target-ema", 0.5,
            "--out", student, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert f"student: {student}" in capsys.readouterr().out
    pipe = difflab.load(student)
    assert pipe.config.process == "cd" and pipe.sampling_defaults()["steps"] == 1
    assert quality(pipe) < 0.15
    assert quality(difflab.load(edm_teacher), sampler="euler", steps=1) > 0.3


def test_consistency_distillation_resumes_exactly_with_its_target_network(edm_teacher, tmp_path):
    ckpt, config, digest = teacher_checkpoint(edm_teacher)

    def make(steps):
        cd = consistency_formulation(config, 18, 0.5, "l2")
        distill_record = {"method": "consistency", "steps": 1, "sampler": "consistency"}
        return student_config(config, ckpt, digest, distill_record, cd, steps=steps, checkpoint_every=3)

    assert_exact_resume(make, MOONS, tmp_path, first_weight(edm_teacher))
    target = latest_checkpoint(tmp_path / "split") / "task_state.safetensors"
    assert target.is_file()


def first_weight(run) -> str:
    return next(iter(difflab.load(run).denoiser.net.state_dict()))


def test_teachers_and_settings_that_cannot_work_are_refused(edm_teacher, moons_ddpm_run, tmp_path):
    with pytest.raises(DifflabError, match="consistency distillation needs an EDM teacher"):
        distill(moons_ddpm_run, tmp_path / "a", method="consistency", steps=2, progress=False)
    with pytest.raises(DifflabError, match="must halve the teacher's 12 steps"):
        distill(edm_teacher, tmp_path / "b", rounds=3, teacher_steps=12, steps=2, progress=False)
    with pytest.raises(DifflabError, match="--target-ema and --distance are settings of --method consistency"):
        distill(edm_teacher, tmp_path / "c", levels=10, steps=2, progress=False)
    with pytest.raises(DifflabError, match="--rounds and --teacher-steps are settings of --method progressive"):
        distill(edm_teacher, tmp_path / "e", method="consistency", rounds=2, steps=2, progress=False)
    with pytest.raises(DifflabError, match="unknown --lr-schedule 'steep'"):
        distill(edm_teacher, tmp_path / "f", rounds=1, teacher_steps=4, lr_schedule="steep", steps=2, progress=False)
    with pytest.raises(DifflabError, match="a cd model is distilled from a teacher"):
        difflab.train(difflab.run_config(MOONS, process="cd", steps=2), tmp_path / "d", progress=False)


def test_a_student_whose_teacher_changed_is_refused(edm_teacher, tmp_path):
    ckpt, config, _ = teacher_checkpoint(edm_teacher)
    record = {"method": "progressive", "steps": 2, "sampler": "ddim"}
    student = student_config(config, ckpt, "0123456789", record, steps=2)
    with pytest.raises(DifflabError, match="no longer holds the weights this student was distilled from"):
        difflab.train(student, tmp_path / "s", progress=False)


def test_cli_distill_errors_are_one_line(capsys, tmp_path):
    code = main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "does not exist")
