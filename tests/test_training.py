import math
from pathlib import Path

import pytest
import torch

from difflab.config import DataConfig, RunConfig, TrainConfig
from difflab.data import sample_toy
from difflab.data.digits import load_digits_split
from difflab.errors import DifflabError
from difflab.formulations.ddpm import DDPMConfig
from difflab.nets import ModelConfig, model_config_for
from difflab.nets.mlp import MLPConfig
from difflab.pipeline import load
from difflab.training import checkpoint as ckpt_mod
from difflab.training.checkpoint import latest_checkpoint, list_checkpoints
from difflab.training.tasks import DenoiserTask
from difflab.training.trainer import Trainer, TrainingDiverged, read_log

CPU = torch.device("cpu")


def _points_config(steps=40, **train):
    data = DataConfig("moons", "points", (2,))
    model = ModelConfig("mlp", MLPConfig(data_dim=2, hidden=32, num_blocks=1, embed_dim=16), "custom")
    kw = dict(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, checkpoint_every=10, log_every=5) | train
    return RunConfig(data, model, DDPMConfig(schedule="linear", timesteps=100, prediction="eps"), TrainConfig(**kw))


def _digits_config(steps, **train):
    data = DataConfig("digits", "images", (1, 8, 8), 8, 1)
    kw = dict(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1) | train
    return RunConfig(
        data,
        model_config_for(data.kind, data.sample_shape, "tiny", dropout=0.1),
        DDPMConfig(schedule="cosine", timesteps=50, prediction="v"),
        TrainConfig(**kw),
    )


def _train(config, data, run_dir, resume=False):
    torch.manual_seed(config.train.seed)
    trainer = Trainer(DenoiserTask(config), data, run_dir, CPU)
    if resume:
        trainer.resume()
    trainer.run(progress=False)
    return trainer


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["points", "images-with-dropout"])
def test_resume_is_bit_identical(tmp_path, kind):
    if kind == "points":
        data, make = sample_toy("moons", 512, 0), _points_config
        n = 40
    else:
        data, make = load_digits_split("train")[0][:64], _digits_config
        n = 6
    straight = _train(make(n), data, tmp_path / "straight")
    _train(make(n // 2), data, tmp_path / "split")
    resumed = _train(make(n), data, tmp_path / "split", resume=True)
    assert resumed.step == straight.step == n
    _assert_same_state(straight.task.denoiser.net.state_dict(), resumed.task.denoiser.net.state_dict())
    _assert_same_state(straight.ema.state_dict(), resumed.ema.state_dict())
    # the half-way run must differ from the end point, or the comparison above proves nothing
    half = load(list_checkpoints(tmp_path / "split")[0], use_ema=False)
    key = "inp.weight" if kind == "points" else "conv_in.weight"
    assert not torch.equal(half.denoiser.net.state_dict()[key], resumed.task.denoiser.net.state_dict()[key])


def test_checkpoint_round_trip_rebuilds_the_same_denoiser(tmp_path):
    trainer = _train(_points_config(20), sample_toy("moons", 256, 0), tmp_path)
    x, sigma = torch.randn(5, 2), torch.tensor([0.1, 0.5, 1.0, 5.0, 50.0])
    raw = {k: v.clone() for k, v in trainer.task.denoiser.net.state_dict().items()}
    for use_ema in (True, False):
        loaded = load(tmp_path, use_ema=use_ema)
        assert loaded.step == 20 and loaded.config == _points_config(20)
        reference = raw if not use_ema else trainer.ema.state_dict()
        _assert_same_state(reference, loaded.denoiser.net.state_dict())
        with torch.no_grad():
            trainer.task.denoiser.net.load_state_dict(reference)
            expected = trainer.task.denoiser.eval()(x, sigma)
            torch.testing.assert_close(loaded.denoiser(x, sigma), expected, rtol=0, atol=0)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = _points_config(10)
    _train(config, sample_toy("moons", 256, 0), tmp_path)
    good = latest_checkpoint(tmp_path)
    calls = {"n": 0}
    real_save = ckpt_mod.save_file

    def crash_on_second_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk died mid-save")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", crash_on_second_file)
    with pytest.raises(OSError, match="mid-save"):
        _train(_points_config(20), sample_toy("moons", 256, 0), tmp_path, resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]  # no half-written folder left
    assert load(tmp_path).step == 10


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path):
    trainer = Trainer(DenoiserTask(_points_config(30)), sample_toy("moons", 256, 0), tmp_path, CPU)
    real_loss, calls = trainer.task.loss_fn, {"n": 0}

    def flaky(denoiser, x0, generator=None, cond=None):
        calls["n"] += 1
        loss = real_loss(denoiser, x0, generator, cond)
        return loss * math.nan if calls["n"] in (3, 4, 5) else loss

    trainer.task.loss_fn = flaky
    trainer.run(progress=False)
    assert trainer.step == 30 and trainer.skipped == 3
    assert all(torch.isfinite(p).all() for p in trainer.task.denoiser.net.parameters())

    broken = Trainer(DenoiserTask(_points_config(30)), sample_toy("moons", 256, 0), tmp_path / "b", CPU)
    broken.task.loss_fn = lambda d, x0, g=None, c=None: real_loss(d, x0, g, c) * math.inf
    with pytest.raises(TrainingDiverged, match="not finite for 10 steps in a row"):
        broken.run(progress=False)
    assert broken.skipped == 10 and broken.step == 0


def test_mixed_precision_choices(tmp_path):
    with pytest.raises(DifflabError, match="fp16 needs a CUDA device"):
        Trainer(DenoiserTask(_points_config(2, mixed_precision="fp16")), sample_toy("moons", 64, 0), tmp_path, CPU)
    trainer = _train(_points_config(3, mixed_precision="bf16"), sample_toy("moons", 64, 0), tmp_path / "bf16")
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in trainer.task.denoiser.net.parameters())


def test_minutes_budget_stops_the_run(tmp_path):
    trainer = _train(_points_config(None, minutes=0.02), sample_toy("moons", 256, 0), tmp_path)
    assert trainer.step > 0 and trainer.elapsed >= 0.02 * 60
    assert latest_checkpoint(tmp_path) is not None


def test_lr_schedules_decay_to_zero_at_the_end_of_the_budget(tmp_path):
    """Warm-up, then the closed forms: cosine 0.5 (1 + cos(pi t)), linear 1 - t, t the share of the budget done."""
    data = sample_toy("moons", 64, 0)
    by_steps = {s: Trainer(DenoiserTask(_points_config(100, lr_schedule=s)), data, tmp_path / s, CPU)
                for s in ("constant", "cosine", "linear")}  # fmt: skip
    for step, share in ((25, 0.25), (50, 0.5), (80, 0.8), (100, 1.0)):
        assert by_steps["constant"].lr_at(step) == pytest.approx(1e-3)
        assert by_steps["cosine"].lr_at(step) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * share)), abs=1e-12)
        assert by_steps["linear"].lr_at(step) == pytest.approx(1e-3 * (1 - share), abs=1e-12)
    assert by_steps["cosine"].lr_at(0) == pytest.approx(1e-3 / 5, rel=1e-3)  # warm-up (5 steps) first
    timed = _points_config(None, minutes=2.0, lr_schedule="linear")
    by_minutes = Trainer(DenoiserTask(timed), data, tmp_path / "m", CPU)
    by_minutes.elapsed = 30.0  # a quarter of the budget, whatever the step
    assert by_minutes.lr_at(10) == pytest.approx(0.75e-3)
    _train(_points_config(40, lr_schedule="cosine"), data, tmp_path / "run")
    logged = [row["lr"] for row in read_log(tmp_path / "run") if "lr" in row]
    assert logged[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 40)))  # the lr of step 5 (of 40)
    assert logged[-1] < 2e-5 and logged == sorted(logged, reverse=True)
    with pytest.raises(DifflabError, match="unknown --lr-schedule 'step'; choose one of constant, cosine, linear"):
        _points_config(10, lr_schedule="step")


@pytest.mark.parametrize(("process", "default"), [("edm", (-1.2, 1.2)), ("ct", (-1.1, 2.0))])
def test_p_mean_and_p_std_set_the_training_noise_levels(tmp_path, capsys, process, default):
    from conftest import run_cli

    from difflab.formulations import make_formulation
    from difflab.training.checkpoint import load_config

    def levels(*flags):
        out = tmp_path / "-".join([process, *flags])
        code, _, err = run_cli(capsys, "train", "--data", "moons", "--process", process, "--steps", "2",
                               "--batch-size", "8", "--out", out, "--no-progress", *flags)  # fmt: skip
        assert code == 0, err
        formulation = make_formulation(load_config(latest_checkpoint(out)).formulation)
        return formulation.config.p_mean, formulation.config.p_std, formulation

    assert levels()[:2] == default
    p_mean, p_std, formulation = levels("--p-mean", "0.4", "--p-std", "0.5")
    assert (p_mean, p_std) == (0.4, 0.5)
    if process == "edm":  # the loss draws ln(sigma) ~ N(0.4, 0.5^2)
        log_sigma = formulation.loss().noise_levels.sample(20_000, torch.Generator().manual_seed(0), "cpu").log()
        assert abs(log_sigma.mean().item() - 0.4) < 0.02 and abs(log_sigma.std().item() - 0.5) < 0.02
    else:  # the loss draws its level pairs by the N(0.4, 0.5^2) mass between them (iCT, Eq. 7)
        from scipy import stats

        loss = formulation.loss()
        loss.begin_step(0, 100)
        levels, probs = loss.pair_distribution("cpu")
        cdf = stats.lognorm(s=0.5, scale=math.exp(0.4)).cdf(levels.numpy())
        assert probs.numpy() == pytest.approx((cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]), rel=1e-6)
