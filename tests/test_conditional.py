"""Class-conditional networks and training: the label embedding, label dropout, `difflab train --conditional` and
`difflab sample --class/--guidance` end to end on a labelled toy."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from difflab.cli.main import main
from difflab.errors import DifflabError
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, unet_preset


def one_line_error(capsys, code: int, *fragments: str) -> None:
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


def test_label_embedding_distinguishes_classes_and_treats_none_as_the_null_label():
    torch.manual_seed(0)
    net = MLP(MLPConfig(data_dim=2, hidden=32, num_classes=3))
    x, c = torch.randn(4, 2), torch.zeros(4)
    by_label = [net(x, c, torch.full((4,), k)) for k in (-1, 0, 1, 2)]
    assert all(not torch.allclose(a, b) for i, a in enumerate(by_label) for b in by_label[i + 1 :])
    torch.testing.assert_close(net(x, c, None), by_label[0])  # no labels = the null label
    # a bare label tensor is shorthand for the cond mapping {"class_label": labels}
    torch.testing.assert_close(net(x, c, {"class_label": torch.full((4,), 2)}), by_label[3])
    assert net.accepts == frozenset({"class_label"})
    unet = UNet(replace(unet_preset("tiny", 8, 1), num_classes=10))
    images = torch.randn(2, 1, 8, 8)
    assert unet(images, torch.zeros(2), torch.tensor([3, -1])).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        net(x, c, torch.full((4,), 3))
    with pytest.raises(TypeError, match="int64"):
        net(x, c, torch.zeros(4))
    unconditional = MLP(MLPConfig(data_dim=2, hidden=32))
    with pytest.raises(DifflabError, match="unconditional"):
        unconditional(x, c, torch.zeros(4, dtype=torch.long))
    with pytest.raises(DifflabError, match="unconditional"):
        unconditional(x, c, {"class_label": torch.zeros(4, dtype=torch.long)})


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """An EDM MLP trained with labels on 8gaussians, 400 steps. Measured (seeds 0, 1, 2): share in the requested
    component 1.000 at w = 1 and w = 3, 0.112, 0.121, 0.123 at w = 0; --class all 0.999 each (at 600 and 1500
    steps the same; 0.114 at w = 0 at 1500)."""
    out = tmp_path_factory.mktemp("cond8")
    code = main(["train", "--data", "8gaussians", "--conditional", "--process", "edm", "--steps", "400",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def _share_in_component(path, k: int) -> float:
    x = torch.from_numpy(np.load(path)).float()
    angles = torch.arange(8) * 2 * math.pi / 8
    centres = 0.8 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return float((torch.cdist(x, centres).argmin(1) == k).float().mean())


def test_conditional_model_samples_the_requested_class_and_cfg_zero_ignores_it(conditional_run, tmp_path, capsys):
    """w = 1 (the conditional model) and w = 3 put nearly all samples in the requested component; w = 0 (the
    unconditional model, as the null label) about 1/8, which is also what a model ignoring the label would give."""
    shares = {}
    for w in ("0", "1", "3"):
        out = tmp_path / f"w{w}.npy"
        code = main(["sample", "--ckpt", str(conditional_run), "--sampler", "heun", "--steps", "20", "--n", "800",
                     "--class", "2", "--guidance", w, "--out", str(out)])  # fmt: skip
        assert code == 0
        shares[w] = _share_in_component(out, 2)
    assert shares["1"] > 0.95 and shares["3"] > 0.97
    assert 0.06 < shares["0"] < 0.2
    code = main(["sample", "--ckpt", str(conditional_run), "--sampler", "heun", "--steps", "20", "--n", "800",
                 "--class", "all", "--out", str(tmp_path / "all.npy")])  # fmt: skip
    assert code == 0
    x = torch.from_numpy(np.load(tmp_path / "all.npy")).float()
    labels = torch.arange(800) % 8
    angles = torch.arange(8) * 2 * math.pi / 8
    centres = 0.8 * torch.stack([angles.cos(), angles.sin()], dim=1)
    assert float((torch.cdist(x, centres).argmin(1) == labels).float().mean()) > 0.95


def test_guidance_and_class_errors_are_one_line(conditional_run, tmp_path, capsys):
    out = str(tmp_path / "x.npy")
    one_line_error(capsys, main(["sample", "--ckpt", str(conditional_run), "--guidance", "2", "--out", out]), "--class")
    one_line_error(capsys, main(["sample", "--ckpt", str(conditional_run), "--class", "8", "--out", out]), "0..7")
    one_line_error(
        capsys, main(["sample", "--ckpt", str(conditional_run), "--class", "1", "--guidance-interval", "0.1", "1",
                      "--out", out]), "--guidance W",
    )  # fmt: skip
    one_line_error(
        capsys, main(["train", "--data", "heart", "--conditional", "--steps", "2", "--out", str(tmp_path / "h")]),
        "labelled data",
    )  # fmt: skip


def test_label_dropout_replaces_the_configured_share_of_labels(tmp_path):
    """The trainer hands the loss labels with ~label_dropout of them replaced by -1, drawn from its noise generator."""
    import argparse

    from difflab.cli import train as train_cmd
    from difflab.data import load_dataset
    from difflab.training.tasks import DenoiserTask
    from difflab.training.trainer import Trainer

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(
        ["--data", "8gaussians", "--out", str(tmp_path), "--conditional", "--label-dropout", "0.3"]
    )
    data = load_dataset("8gaussians")
    config = train_cmd.config_from_args(args, data)
    assert [(s.name, s.dropout) for s in config.conditioning] == [("class_label", 0.3)]
    trainer = Trainer(DenoiserTask(config), data.data, tmp_path, torch.device("cpu"),
                      cond_data={"class_label": data.labels})  # fmt: skip
    seen = []
    loss_fn = trainer.task.loss_fn
    trainer.task.loss_fn = lambda denoiser, x0, gen, cond: (seen.append(cond), loss_fn(denoiser, x0, gen, cond))[1]
    for _ in range(20):
        trainer.train_step()
    assert all(set(cond) == {"class_label"} for cond in seen)
    labels = torch.cat([cond["class_label"] for cond in seen])
    dropped = float((labels == -1).float().mean())
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(labels))
    assert set(labels[labels >= 0].tolist()) == set(range(8))
