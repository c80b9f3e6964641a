"""eval.json and a short markdown report of an evaluation (one setting, or a sweep over NFE)."""

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
