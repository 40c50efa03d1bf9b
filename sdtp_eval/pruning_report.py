"""The ``sdtp`` model's pruning report: per-task means (``get_model_info()["sdtp"]["per_task"]``) and per-request
records (the ``sdtp`` field of lm-eval's logged samples, ``--log_samples``)."""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict

#: per-request records, (task, doc_id) -> [(request idx, record)]
SampleRecords = dict[tuple[str, int], list[tuple[int, dict]]]


class PruningStats:
    """Per-task running means of 1/τ and of the tokens kept after each stage."""

    def __init__(self, stage_layers: list[int]):
        self.stage_layers = stage_layers
        self.sums: dict[str, dict] = defaultdict(
            lambda: {
                "n": 0,
                "compression": 0.0,
                "kept": None,
                "length": 0,
                "timed": 0,
                "prefill_s": 0.0,
                "total_s": 0.0,
            }
        )

    def add(self, task: str, result, rows: list[int] | None = None, seconds: tuple[float, float] | None = None) -> None:
        """Add rows of a :class:`~sdtp_core.engine.PrefillResult`; ``seconds`` = (prefill, prefill + decoding)
        of a generation batch, shared equally by its rows."""
        rows = range(result.lengths.shape[0]) if rows is None else rows
        share = 1.0 / result.lengths.shape[0]
        for b in rows:
            entry = self.sums[task]
            kept = [float(result.kept_counts[b, layer]) for layer in self.stage_layers]
            entry["n"] += 1
            entry["compression"] += float(result.compression[b])
            entry["length"] += int(result.lengths[b])
            entry["kept"] = kept if entry["kept"] is None else [a + k for a, k in zip(entry["kept"], kept)]
            if seconds is not None:
                entry["timed"] += 1
                entry["prefill_s"] += seconds[0] * share
                entry["total_s"] += seconds[1] * share

    def merge(self, other: dict) -> None:
        for task, e in other.items():
            mine = self.sums[task]
            mine["n"] += e["n"]
            mine["compression"] += e["compression"]
            mine["length"] += e["length"]
            for key in ("timed", "prefill_s", "total_s"):
                mine[key] += e[key]
            if e["kept"] is not None:
                mine["kept"] = e["kept"] if mine["kept"] is None else [a + k for a, k in zip(mine["kept"], e["kept"])]

    def summary(self) -> dict:
        return {
            task: {
                "requests": e["n"],
                "mean_compression": e["compression"] / e["n"],
                "mean_prompt_tokens": e["length"] / e["n"],
                "mean_kept_per_stage": [k / e["n"] for k in e["kept"] or []],
                **(
                    {
                        "mean_prefill_seconds": e["prefill_s"] / e["timed"],
                        "mean_generation_seconds": e["total_s"] / e["timed"],
                    }
                    if e["timed"]
                    else {}
                ),
            }
            for task, e in sorted(self.sums.items())
            if e["n"]
        }


def prefill_record(result, b: int, stage_layers: list[int]) -> dict:
    """Row ``b`` of a prefill as one request's record: prompt tokens, tokens kept after each stage, 1/τ."""
    return {
        "prompt_tokens": int(result.lengths[b]),
        "kept_per_stage": [int(result.kept_counts[b, layer]) for layer in stage_layers],
        "compression": round(float(result.compression[b]), 4),
    }


def merge_ranks(parts: list[tuple[dict, SampleRecords]], stage_layers: list[int]) -> tuple[PruningStats, SampleRecords]:
    """Every rank's ``(stats sums, sample records)`` merged into one (rank 0's view)."""
    merged, records = PruningStats(stage_layers), defaultdict(list)
    for sums, recs in parts:
        merged.merge(sums)
        for key, value in recs.items():
            records[key].extend(value)
    return merged, records


def annotate_samples(
    records: SampleRecords, samples: dict[str, list[dict]], selected: dict[str, list[int]] | None = None
) -> None:
    """Add ``sdtp`` (one record per request of the sample) to every logged sample that has ``records``.

    ``selected``: lm-eval's ``--samples`` ({task: sorted doc indices}); a request of such a task carries its
    document's position in that list as its doc_id, while the logged sample carries the index."""
    for task, rows in samples.items():
        position = {doc: k for k, doc in enumerate((selected or {}).get(task) or [])}
        for sample in rows:
            doc_id = sample.get("doc_id")
            found = records.get((task, position.get(doc_id, doc_id)))
            if found:
                # one record per request, in request order, merging what each stage logged (compression,
                # pruning); duplicates (data-parallel padding) collapse
                merged: dict[int, dict] = defaultdict(dict)
                for idx, record in found:
                    merged[idx].update(record)
                sample["sdtp"] = [merged[idx] for idx in sorted(merged)]


def _annotating(evaluate, model_class):
    """Wrap lm-eval's ``evaluate`` so logged samples of a ``model_class`` run carry their pruning records."""

    signature = inspect.signature(evaluate)

    @functools.wraps(evaluate)
    def wrapper(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        call = signature.bind_partial(*args, **kwargs).arguments
        lm = getattr(call.get("lm"), "lm", call.get("lm"))  # CachingLM (--use_cache) wraps the model
        if isinstance(lm, model_class) and isinstance(results, dict) and results.get("samples"):
            lm.annotate_samples(results["samples"], call.get("samples"))
        return results

    wrapper._sdtp_annotating = True
    return wrapper


def install_sample_annotation(model_class) -> None:
    """Make lm-eval's ``evaluate`` annotate the logged samples of ``model_class`` runs (once)."""
    import lm_eval.evaluator as evaluator

    if not getattr(evaluator.evaluate, "_sdtp_annotating", False):
        evaluator.evaluate = _annotating(evaluator.evaluate, model_class)
