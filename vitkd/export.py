"""An analysis as files: JSON with the numbers (and maps), long-format CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np

from .agreement import pair_divergences
from .analysis import ImageAnalysis, ModelAnalysis
from .maps import cls_attention_maps, heads_text, rollout_map

__all__ = ["analysis_to_json", "analysis_to_csv", "CSV_COLUMNS"]


def _rounded(values: np.ndarray, digits: int = 6) -> Any:
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _model_record(result: ModelAnalysis, analysis: ImageAnalysis, include_maps: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "predicted": result.predicted,
        "predicted_class": analysis.class_names[result.predicted],
        "top_k": [{"index": p.index, "class": p.name, "prob": round(p.prob, 6)} for p in result.top_k],
        "probs": _rounded(result.probs),
    }
    record["grid"] = list(result.layout.grid_size)
    if include_maps:  # on the model's own grid
        record["cls_attention"] = [_rounded(cls_attention_maps(block, result.layout)) for block in result.attn_probs]
        record["rollout"] = _rounded(rollout_map(result.rollout, result.layout))
    return record


def analysis_to_json(analysis: ImageAnalysis, image_name: str | None = None, include_maps: bool = True) -> str:
    """The numbers of an analysis as JSON: predictions, flag, distilled-pair divergences and (optionally) the
    per-block, per-head CLS-to-patch maps [L][H][gh][gw] and rollout maps [gh][gw], each model on its own
    ``grid``; the top-level ``grid`` is the one divergences are compared on (the coarser)."""
    flag = analysis.flag
    doc = {
        "image": image_name,
        "class_names": list(analysis.class_names),
        "true_label": analysis.true_label,
        "true_class": None if analysis.true_label is None else analysis.class_names[analysis.true_label],
        "agree": flag.agree,
        "status": flag.status,
        "grid": list(analysis.layout.grid_size),
        "num_prefix_tokens": analysis.layout.num_prefix_tokens,
        "rollout": {"head_fusion": analysis.head_fusion, "discard_ratio": analysis.discard_ratio},
        "head_map": None if analysis.head_map is None else analysis.head_map.to_list(),
        "pair_divergence": [dict(r, js=round(r["js"], 6)) for r in pair_divergences(analysis)],
        "teacher": _model_record(analysis.teacher, analysis, include_maps),
        "student": _model_record(analysis.student, analysis, include_maps),
    }
    return json.dumps(doc, indent=1)


CSV_COLUMNS = ("quantity", "model", "block", "head", "teacher_block", "teacher_head", "class_index", "class_name",
               "value")


def analysis_to_csv(analysis: ImageAnalysis) -> str:
    """Long-format CSV: every class probability of both models and every distilled pair's JS divergence
    (``teacher_head`` ``{0,1}`` for a group of teacher heads)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in (analysis.teacher, analysis.student):
        for idx, prob in enumerate(result.probs.tolist()):
            writer.writerow(["probability", result.role, "", "", "", "", idx, analysis.class_names[idx],
                             f"{prob:.6g}"])
    for r in pair_divergences(analysis):
        writer.writerow(["pair_js", "student", r["student_block"], r["student_head"], r["teacher_block"],
                         heads_text(r["teacher_head"]), "", "", f"{r['js']:.6g}"])
    return buf.getvalue()
