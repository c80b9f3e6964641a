"""`difflab eval --data shapes --prompts FILE|test` (issue 12): caption adherence per split beside FD in the shapes
evaluator's feature space. The evaluator is exact, so stand-in models that draw known scenes give known scores."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

import difflab
from difflab.data.shapes import POSITIONS, parse_caption, render, scene_satisfies, spec_split, to_tensor
from difflab.data.shapes.world import INVERSE
from difflab.errors import DifflabError
from difflab.eval import adherence
from difflab.eval.adherence import evaluate_prompts, prompt_set, read_caption_file, scene_for, sweep_guidance

TRAIN = ["a red circle at the top left", "a small blue square left of a yellow cross", "there is a white disc"]
TEST = ["a red triangle in the centre", "the big blue circle above an orange square", "green plus, bottom right"]


class DrawingPipe:
    """Stands in for a text model of the shapes world: sample i is a rendered scene satisfying ``draw(spec)`` of its
    prompt's caption spec (draw returns None: a black image), scenes from one generator per call."""

    accepts = frozenset({"text_tokens"})

    def __init__(self, draw=lambda spec: spec, resolution: int = 16):
        self.draw, self.sample_shape = draw, (3, resolution, resolution)
        self.config = SimpleNamespace(data=SimpleNamespace(name="shapes"), model=SimpleNamespace(text="a text config"))
        self.calls = []

    def sample(self, *, seeds, prompt, **kwargs):
        self.calls.append({"seeds": list(seeds), "prompt": list(prompt), **kwargs})
        rng, blank = np.random.default_rng(123), np.zeros((self.sample_shape[1],) * 2 + (3,), np.uint8)
        specs = [self.draw(parse_caption(p)) for p in prompt]
        images = [blank if s is None else render(scene_for(s, rng), self.sample_shape[1]) for s in specs]
        return to_tensor(np.stack(images))


def _other_place(spec):
    """The same objects with the inverse relation, or at another position (a free position stays free)."""
    if spec.relation is not None:
        return replace(spec, relation=INVERSE[spec.relation])
    if spec.position is None:
        return spec
    return replace(spec, position=POSITIONS[(POSITIONS.index(spec.position) + 4) % len(POSITIONS)])


@pytest.fixture(scope="module")
def prompts():
    """100 held-out and 100 train captions of the fixed prompt set."""
    full = prompt_set()
    return full[:100] + full[200:300]


def test_the_prompt_set_is_the_test_split_then_as_many_train_captions():
    full = prompt_set()
    assert len(full) == 400 and full == prompt_set()
    assert full[:200] == list(difflab.load_dataset("shapes", resolution=16, split="test", size=200).captions)
    assert full[200:] == list(difflab.load_dataset("shapes", resolution=16, split="train", size=200).captions)
    assert [spec_split(parse_caption(c)) for c in full] == ["test"] * 200 + ["train"] * 200


def test_scene_for_satisfies_its_caption_and_varies_what_the_caption_leaves_free():
    rng = np.random.default_rng(0)
    for text in TRAIN + TEST + prompt_set()[:50]:
        assert scene_satisfies(scene_for(parse_caption(text), rng), parse_caption(text)), text
    scenes = [scene_for(parse_caption("there is a white disc"), rng) for _ in range(40)]
    assert {s.objects[0].size for s in scenes} == {"small", "large"} and len({s.position for s in scenes}) >= 6


def test_a_model_that_draws_its_captions_adheres_fully_and_its_fd_is_near_zero(prompts):
    pipe = DrawingPipe()
    row = evaluate_prompts(pipe, prompts, seed=7, guidance=3.0, steps=4)
    assert row["guidance"] == 3.0 and row["n"] == 200
    assert pipe.calls == [{"seeds": list(range(7, 207)), "prompt": prompts, "guidance": 3.0, "steps": 4,
                           "batch_size": 256, "progress": False}]  # fmt: skip
    for split in ("all", "train", "test"):
        acc = row["adherence"][split]
        assert [acc[k] for k in ("colour", "shape", "size", "position", "relation", "full")] == [1.0] * 6, split
    assert row["adherence"]["train"]["n"] == row["adherence"]["test"]["n"] == 100
    swapped = evaluate_prompts(DrawingPipe(lambda spec: parse_caption("a white square at the top right")), prompts)
    assert swapped["adherence"]["all"]["full"] < 0.05 and swapped["adherence"]["all"]["colour"] < 0.3
    for split in ("all", "train", "test"):  # other scenes of the same captions are close; one fixed scene is far
        assert row["fd"][split] < 0.02 and swapped["fd"][split] > 20 * row["fd"][split], split


def test_the_wrong_layout_fails_position_and_relation_only(prompts):
    row = evaluate_prompts(DrawingPipe(_other_place), prompts)["adherence"]["all"]
    assert [row[k] for k in ("colour", "shape", "size")] == [1.0] * 3
    assert row["position"] == 0.0 and row["relation"] == 0.0 and row["n_relation"] > 50 and row["n_position"] > 30
    unplaced = sum(parse_caption(c).relation is None and parse_caption(c).position is None for c in prompts)
    assert row["full"] == unplaced / len(prompts)


def test_each_caption_counts_under_its_own_split_and_each_sample_gets_its_own_seed():
    pipe = DrawingPipe(lambda spec: spec if spec_split(spec) == "test" else None, resolution=32)
    rows = sweep_guidance(pipe, TRAIN[:2] + TEST, [1.0, 5.0], n_per_prompt=2, seed=3)
    assert [r["guidance"] for r in rows] == [1.0, 5.0] and rows[0]["adherence"] == rows[1]["adherence"]
    assert (
        pipe.calls[0]["seeds"] == list(range(3, 13))
        and pipe.calls[1]["seeds"] == list(range(3, 13))
        and pipe.calls[0]["prompt"][:4] == [TRAIN[0]] * 2 + [TRAIN[1]] * 2
    )
    acc, fd = rows[0]["adherence"], rows[0]["fd"]
    assert (acc["train"]["n"], acc["test"]["n"], acc["all"]["n"]) == (4, 6, 10)
    assert (acc["train"]["full"], acc["test"]["full"], acc["all"]["full"]) == (0.0, 1.0, 0.6)
    assert fd["train"] > 3 * fd["test"]  # blank images against scenes; other scenes of the same captions
    only_train = evaluate_prompts(pipe, TRAIN, n_per_prompt=2)
    assert set(only_train["adherence"]) == set(only_train["fd"]) == {"all", "train"}


def test_a_caption_file_is_read_line_by_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(f"{TRAIN[0]}\n\n  {TEST[0]}  \n")
    assert read_caption_file(path) == [TRAIN[0], TEST[0]]
    path.write_text(f"{TRAIN[0]}\n\na purple circle\n")
    with pytest.raises(DifflabError, match=r"captions.txt' line 3: cannot read caption 'a purple circle'"):
        read_caption_file(path)
    path.write_text("\n \n")
    with pytest.raises(DifflabError, match="holds no caption"):
        read_caption_file(path)
    with pytest.raises(DifflabError, match="is not a file"):
        read_caption_file(tmp_path)


def test_only_text_models_of_the_shapes_world_are_scored():
    pipe = DrawingPipe()
    pipe.accepts, pipe.config.model.text = frozenset({"class_label"}), None
    with pytest.raises(DifflabError, match=r"needs a text model; this one is not conditioned on text \(it takes cl"):
        evaluate_prompts(pipe, TRAIN)
    pipe = DrawingPipe()
    pipe.config.data.name = "two-colours"
    with pytest.raises(DifflabError, match="trained on 'two-colours'"):
        evaluate_prompts(pipe, TRAIN)
    assert pipe.calls == []


def test_eval_prompts_writes_json_and_report_and_prints_a_table(text_run, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(TRAIN + TEST) + "\n")
    out = tmp_path / "eval"
    code, printed, _ = run_cli(capsys, "eval", "--ckpt", text_run, "--data", "shapes", "--prompts", captions,
                               "--n-per-prompt", 2, "--steps", 2, "--guidance-sweep", "1,3", "--negative",
                               "a white cross", "--out", out)  # fmt: skip
    assert code == 0, printed
    result = json.loads((out / "eval.json").read_text())
    settings, rows = result["settings"], result["rows"]
    assert {"source", "prompts", "n_prompts", "n_per_prompt", "seed", "resolution", "evaluator", "reference",
            "sampler", "steps", "grid", "negative_prompt", "options"} <= set(settings)  # fmt: skip
    assert (settings["n_prompts"], settings["n_per_prompt"], settings["resolution"]) == (6, 2, 16)
    assert [r["guidance"] for r in rows] == [1.0, 3.0]
    for row in rows:
        assert set(row) == {"guidance", "n", "adherence", "fd"} and row["n"] == 12
        assert set(row["adherence"]) == set(row["fd"]) == {"all", "train", "test"}
        assert row["adherence"]["test"]["n"] == 6 and row["fd"]["all"] >= 0
        assert {"colour", "shape", "size", "position", "relation", "full", "n_full"} <= set(row["adherence"]["all"])
    report = (out / "report.md").read_text()
    assert adherence.ShapesFeatures.name in report and "not Inception" in report and "a white cross" in report
    assert printed.count("| 3 | test | 6 |") == 1 and "full caption" in printed and "wrote" in printed


def test_the_fixed_prompt_set_runs_through_the_cli(text_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(adherence, "PROMPT_SET_SIZE", 10)  # 200 + 200 in use; 10 + 10 keep the test short
    code, printed, _ = run_cli(capsys, "eval", "--ckpt", text_run, "--data", "shapes", "--prompts", "test",
                               "--steps", 1, "--out", tmp_path / "eval")  # fmt: skip
    assert code == 0, printed
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    row = result["rows"][0]
    assert row["guidance"] is None and row["adherence"]["train"]["n"] == row["adherence"]["test"]["n"] == 10
    assert result["settings"]["prompts"].startswith("test: the first 10 captions of the shapes test split")
    assert "| none | train | 10 |" in printed


def test_prompt_errors_are_one_line_and_come_before_any_work(text_run, tmp_path, capsys):
    out = tmp_path / "never"
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{TRAIN[0]}\na red circle beside a cat\n")
    bad.with_name("one.txt").write_text(f"{TRAIN[0]}\n")
    base = ["eval", "--ckpt", text_run, "--out", out]
    code, _, err = run_cli(capsys, *base, "--prompts", "test")
    assert_one_line_error(code, err, "--prompts needs --data shapes")
    code, _, err = run_cli(capsys, *base, "--data", "shapes", "--prompts", bad)
    assert_one_line_error(code, err, "bad.txt' line 2: cannot read caption 'a red circle beside a cat'")
    code, _, err = run_cli(capsys, *base, "--data", "shapes", "--prompts", "test", "--guidance-sweep", "1,x")
    assert_one_line_error(code, err, "--guidance-sweep '1,x' is not a list of scales")
    code, _, err = run_cli(capsys, *base, "--data", "shapes", "--prompts", "test", "--n", 10)
    assert_one_line_error(code, err, "--n does not apply to --prompts")
    code, _, err = run_cli(capsys, *base, "--data", "shapes", "--prompts", bad.with_name("one.txt"), "--n-per-prompt",
                           3, "--seed", 2**63 - 2)  # fmt: skip
    assert_one_line_error(code, err, "but --seed 9223372036854775806 with 1 prompt x --n-per-prompt 3 gives seeds")
    code, _, err = run_cli(capsys, *base, "--guidance-sweep", "1,2")
    assert_one_line_error(code, err, "--guidance-sweep needs --prompts")
    moons = tmp_path / "moons"
    assert run_cli(capsys, "train", "--data", "moons", "--steps", 2, "--out", moons, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "eval", "--ckpt", moons, "--data", "shapes", "--prompts", "test", "--out", out)
    assert_one_line_error(code, err, "--prompts needs a text model", "--text-encoder scratch")
    assert not out.exists()
