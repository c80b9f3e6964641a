"""`difflab demo --task txt2img`: the relation analysis counts reversals exactly on rendered scenes, and the demo
writes its figures and metrics from a few training steps."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from difflab.cli.main import main
from difflab.data.shapes import Scene, parse_caption, render
from difflab.data.shapes.world import INVERSE, place_pair
from difflab.text_demo import relation_reversals
from difflab.training.checkpoint import latest_checkpoint, load_config
from difflab.training.trainer import read_log

CAPTIONS = [
    "a large red circle left of a large green square",
    "a large white cross above a large cyan triangle",
    "a large orange square right of a large magenta circle",
    "a large yellow triangle below a large blue cross",
]


def _objects(caption: str, rng: np.random.Generator, reverse: bool):
    """The caption's two objects placed as the caption says, or with the relation the other way round."""
    spec = parse_caption(caption)
    a, b = ((o.shape, o.colour, o.size) for o in spec.objects)
    relation = INVERSE[spec.relation] if reverse else spec.relation
    return place_pair(rng, a, relation, b), relation


def _images(captions, *, reverse=False, drop_second=False, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for caption in captions:
        pair, relation = _objects(caption, rng, reverse)
        scene = Scene(pair[:1]) if drop_second else Scene(pair, relation=relation)
        images.append(render(scene, 32))
    return np.stack(images)


def test_scenes_drawn_the_other_way_round_are_all_reversals():
    captions = CAPTIONS * 3
    counts = relation_reversals(_images(captions, reverse=True), captions)
    assert counts["n"] == counts["both_found"] == counts["reversed"] == 12 and counts["correct"] == 0
    assert counts["reversed_share"] == 1.0


def test_scenes_drawn_as_captioned_are_never_reversals():
    captions = CAPTIONS * 3
    counts = relation_reversals(_images(captions), captions)
    assert counts["correct"] == counts["both_found"] == 12 and counts["reversed"] == 0
    assert counts["reversed_share"] == 0.0


def test_a_missing_object_is_neither_right_nor_reversed():
    counts = relation_reversals(_images(CAPTIONS, reverse=True, drop_second=True), CAPTIONS)
    assert counts["missing"] == 4 and counts["reversed"] == counts["correct"] == counts["both_found"] == 0
    assert counts["reversed_share"] is None
    mixed = np.concatenate([_images(CAPTIONS[:2], reverse=True), _images(CAPTIONS[2:], drop_second=True)])
    counts = relation_reversals(mixed, CAPTIONS)
    assert (counts["reversed"], counts["missing"], counts["reversed_share"]) == (2, 2, 1.0)


@pytest.mark.slow
def test_the_txt2img_demo_writes_its_figures_and_metrics(tmp_path, capsys, monkeypatch):
    """The structure of what the demo writes, from 10 training steps on 256 scenes and 2-step sampling of a few
    prompts; that the text model learns is tested in test_txt2img.py."""
    import difflab.cli.demo as demo
    import difflab.text_demo as text_demo

    monkeypatch.setattr(demo, "TXT2IMG_SCENES", 256)
    monkeypatch.setattr(demo, "TXT2IMG_BATCH", 16)
    settings = {"SWEEP_PROMPTS": 3, "RELATION_PROMPTS": 2, "SAMPLE_STEPS": 2, "GRID_SEEDS": 2, "HELDOUT_ROWS": 2,
                "SCALES": (1.0, 3.0)}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setattr(text_demo, name, value)
    code = main(["demo", "--task", "txt2img", "--steps", "10", "--out", str(tmp_path), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for name in ("prompts.png", "heldout.png", "guidance.png", "relations.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 300, name
        assert str(tmp_path / name) in out, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "txt2img" and metrics["train_steps"] == 10 and metrics["process"] == "edm"
    assert metrics["train_minutes"] >= 0 and metrics["train_budget_minutes"] is None and metrics["seed"] == 0
    config, log = load_config(latest_checkpoint(tmp_path / "run")), read_log(tmp_path / "run")
    assert (config.formulation.p_mean, config.formulation.p_std) == (metrics["p_mean"], metrics["p_std"]) == (0.4, 1.4)
    warm = demo.TXT2IMG_LR * 10 / 200  # the constant schedule's lr at step 10 of the 200-step warm-up
    assert metrics["lr_schedule"] == "cosine" and log[-1]["step"] == 10 and log[-1]["lr"] < 0.05 * warm  # decayed
    assert metrics["prompts"]["seeds"] == [0, 1] and len(metrics["prompts"]["full"]) == len(text_demo.PROMPTS)
    assert len(metrics["heldout"]["full"]) == 2
    sweep = metrics["guidance_sweep"]["rows"]
    assert [r["guidance"] for r in sweep] == [1.0, 3.0]
    assert all(r["n"] == 6 and r["adherence"]["test"]["n"] == 3 and "train" in r["fd"] for r in sweep)
    relations = metrics["relations"]["rows"]
    assert [r["guidance"] for r in relations] == [1.0, 3.0]
    assert all(r["n"] == 4 and r["both_found"] == r["n"] - r["missing"] for r in relations)
    assert "relations right" in out and "full caption" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--task", "img2txt"], "unknown --task 'img2txt': the demo runs unconditional or txt2img"),
        (["--task", "txt2img", "--process", "pfgm"], "the txt2img demo trains EDM on the shapes world"),
        (["--task", "txt2img", "--data", "digits"], "the txt2img demo trains EDM on the shapes world"),
    ],
)
def test_bad_txt2img_demo_arguments_are_one_line_errors(argv, fragment, tmp_path, capsys):
    code, _, err = run_cli(capsys, "demo", *argv, "--out", tmp_path)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()
