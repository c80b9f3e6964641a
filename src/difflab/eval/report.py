"""eval.json and a short markdown report of an evaluation (one setting, or a sweep over NFE), and of a caption-adherence
evaluation of a text model on the shapes world (`write_prompt_report`: one row per guidance scale and split)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difflab.atomic import write_text_atomic
from difflab.viz import save_quality_vs_nfe

_COLUMNS = [
    ("nfe", "NFE", "{}"),
    ("fid", "FID", "{:.3f}"),
    ("kid_mean", "KID", "{:.5f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("inception_score_mean", "IS", "{:.3f}"),
    ("sw2", "SW2", "{:.4f}"),
]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) if key in r else "" for key, _, fmt in cols) + " |")
    return lines


def _method_lines(row: dict[str, Any]) -> list[str]:
    """How the numbers were computed: preprocessing of the samples, KID subsets, precision/recall's k."""
    lines = []
    if "quantised_8bit" in row:
        lines.append(
            "- preprocessing: samples were clipped to [-1, 1] and quantised to 8 bits (256 levels per channel, as "
            "when saved as uint8 PNG) before feature extraction, as the published FID protocols (pytorch-fid, "
            "clean-fid) do"
            if row["quantised_8bit"]
            else "- preprocessing: none (points are scored as they are, not quantised)"
        )
    kid = "- KID: unbiased MMD^2, cubic polynomial kernel"
    if "kid_subset_size" in row:
        kid += f"; mean and std over {row['kid_subsets']} random subsets of {row['kid_subset_size']} samples per set"
    return [*lines, kid, f"- precision/recall: k = {row['pr_k']} nearest neighbours"]


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write eval.json, report.md and, for sweeps, quality_vs_nfe.png; returns the paths written.

    result: {"settings": {...}, "rows": [metrics dicts, each with "nfe" and "steps"]}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "eval.json", out_dir / "report.md"]
    write_text_atomic(written[0], json.dumps(result, indent=2, sort_keys=True))
    s, rows = result["settings"], result["rows"]
    first = rows[0]
    lines = [
        "# difflab evaluation",
        "",
        f"- samples: {s['source']}",
        f"- sampler settings: {s.get('sampler', 'n/a')}, options {s.get('options', {})}, seed {s.get('seed', 'n/a')}",
        f"- samples per setting: {first['n']}; reference: {first['reference']} ({first['n_reference']} items)",
        f"- feature extractor: {first['extractor']}"
        + ("" if first["comparable_with_papers"] else " (not comparable with published numbers)"),
        *_method_lines(first),
        "",
        *_table(rows),
    ]
    if len(rows) > 1:
        plot = out_dir / "quality_vs_nfe.png"
        save_quality_vs_nfe({s.get("sampler", "samples"): [(r["nfe"], r["fid"]) for r in rows]}, plot)
        lines += ["", f"![FID vs NFE]({plot.name})"]
        written.append(plot)
    write_text_atomic(written[1], "\n".join(lines) + "\n")
    return written


_ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "full")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def prompt_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of caption-adherence rows (`difflab.eval.adherence`): one line per guidance scale and split,
    accuracies in percent ("-": nothing of that kind was asked), FD in the evaluator's feature space."""
    lines = ["| guidance | split | samples | colour | shape | size | position | relation | full caption | FD |",
             "|" + "---|" * 10]  # fmt: skip
    for r in rows:
        w = "none" if r["guidance"] is None else f"{r['guidance']:g}"
        for split, acc in r["adherence"].items():
            fd = r["fd"].get(split)
            cells = [w, split, str(acc["n"]), *(_percent(acc[a]) for a in _ATTRIBUTES)]
            lines.append("| " + " | ".join([*cells, "-" if fd is None else f"{fd:.4f}"]) + " |")
    return lines


def write_prompt_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """eval.json and report.md of a caption-adherence evaluation; returns the paths written.

    result: {"settings": {source, prompts, n_prompts, n_per_prompt, resolution, sampler, options, steps, seed,
    evaluator, reference, ...}, "rows": [`evaluate_prompts` results, one per guidance scale]}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "eval.json", out_dir / "report.md"]
    write_text_atomic(written[0], json.dumps(result, indent=2, sort_keys=True))
    s = result["settings"]
    lines = [
        "# difflab caption adherence (shapes world)",
        "",
        f"- samples: {s['source']}",
        f"- prompts: {s['prompts']} ({s['n_prompts']} captions x {s['n_per_prompt']} samples; sample i uses seed "
        f"{s['seed']} + i, seeds {s['seed']}..{s['seed'] + s['n_prompts'] * s['n_per_prompt'] - 1})",
        f"- sampler settings: {s['sampler']}, {s['steps']} steps, options {s.get('options', {})}"
        + (f", negative prompt '{s['negative_prompt']}'" if s.get("negative_prompt") else ""),
        f"- evaluator: {s['evaluator']}: scenes recovered exactly from the pixels (difflab.eval.shapes); splits: "
        "train = seen compositions, test = held-out compositions; accuracies in percent",
        f"- FD: Frechet distance in the evaluator's own feature space ({s['evaluator']}), not Inception; not "
        f"comparable with published FID. Reference: {s['reference']}",
        "- preprocessing: samples clipped to [-1, 1] and quantised to 8 bits before scoring",
        "",
        *prompt_table(result["rows"]),
    ]
    write_text_atomic(written[1], "\n".join(lines) + "\n")
    return written
