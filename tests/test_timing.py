"""Stage timing, the profile report's schema, and the decoding speedups' exactness (tiny random models).

No timing assertions: only the accounting (stages add up to the measured totals by construction, every
layer and stage is timed once per pass) and the structure of what ``--profile`` writes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.attention import layout_mask
from sdtp_core.bench.breakdown import RECORD_KEYS, breakdown_record, run_profile, trace_summary
from sdtp_core.bench.breakdown_report import PER_TOKEN_KEYS
from sdtp_core.bench.machine import machine_info
from sdtp_core.cache import ReservedLayer
from sdtp_core.engine import SDTPEngine
from sdtp_core.generate import decode_loop, generate, resolve_generation_config
from sdtp_core.timing import StageTimer, group_stages, segment_names


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, 96, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    return ids, mask


def test_segments_and_grouping():
    assert segment_names(6, [1, 3, 4]) == ["layers 0-0", "layers 1-2", "layers 1-2", "layers 3-3"] + ["layers 4-5"] * 2
    assert segment_names(3, []) == ["layers 0-2"] * 3
    stages = {"embed": 1.0, "layer.00": 2.0, "prune.0": 0.5, "layer.01": 3.0, "layer.02": 4.0, "head": 0.25}
    grouped = group_stages(stages, 3, [1])
    assert list(grouped) == ["embed", "layers 0-0", "prune.0", "layers 1-2", "head"]
    assert grouped["layers 1-2"] == 7.0
    assert sum(grouped.values()) == sum(stages.values())


@pytest.mark.parametrize("mode", ["dense", "pruned"])
def test_breakdown_covers_every_stage_and_sums_to_the_measured_totals(mode):
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    timer = StageTimer()
    ids = left_padded([40])[0]
    out = generate(engine, ids, max_new_tokens=5, prune=mode == "pruned", timer=timer)
    layers = model.config.num_hidden_layers
    steps = out.sequences.shape[1] - 1
    assert steps == 4
    for i in range(layers):
        assert timer.calls[f"prefill/layer.{i:02d}"] == 1
        assert timer.calls[f"decode/layer.{i:02d}"] == steps
    assert timer.calls["decode/select"] == steps + 1
    assert timer.calls["prefill/head"] == timer.calls["prefill/embed"] == 1
    prunes = [k for k in timer.calls if k.startswith("prefill/prune.")]
    assert len(prunes) == (3 if mode == "pruned" else 0)

    rec = breakdown_record(engine, out, timer, mode)
    seg = set(segment_names(layers, [1, 3, 4] if mode == "pruned" else []))
    assert {k for k in rec["prefill_stages"] if k.startswith("layers ")} == seg
    # stages + "other" reproduce the measured totals exactly; the timed stages never exceed them
    assert sum(rec["prefill_stages"].values()) == pytest.approx(rec["prefill_s"], rel=1e-9)
    assert sum(rec["decode_stages"].values()) == pytest.approx(rec["decode_s"], rel=1e-9)
    assert rec["prefill_stages"]["other"] >= 0 and rec["decode_stages"]["other"] >= 0
    assert 0 < rec["stage_sum_ratio"] <= 1
    per = rec["per_token"]
    assert per["model_s"] + per["overhead_s"] == pytest.approx(per["total_s"], rel=1e-9)
    assert per["cache_s"] + per["select_s"] + per["other_s"] <= per["overhead_s"] + 1e-12
    assert sum(rec["prefill_layers"].values()) == pytest.approx(
        sum(v for k, v in rec["prefill_stages"].items() if k.startswith("layers ")), rel=1e-9
    )


def test_profile_writes_jsonl_records_reports_and_a_valid_chrome_trace(tmp_path):
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    meta = {"command": "test", "machine": machine_info(), "settings": {"dtype": "float32"}}
    report = run_profile(
        engine,
        tmp_path,
        lengths=[30],
        new_tokens=4,
        reps=2,
        seed=0,
        trace_tokens=2,
        trace_max_length=None,
        vs_tokens=3,
        vs_reps=1,
        meta=meta,
    )
    records = [json.loads(line) for line in (tmp_path / "timing_breakdown.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("breakdown") == 4 and kinds.count("plain") == 2 and kinds.count("trace") == 2
    assert kinds.count("decode_vs_generate") == 1
    for r in records:
        assert r["meta"]["machine"]["cpu_flags"].keys() >= {"avx2", "avx512_bf16", "amx_bf16"}
        if r["kind"] == "breakdown":
            assert set(RECORD_KEYS) <= r.keys()
            assert set(r["per_token"]) == set(PER_TOKEN_KEYS)
            assert r["dtype"] == "float32" and r["length"] == 30 and r["mode"] in ("dense", "pruned")
            assert r["kv_cache_bytes"] > 0 and r["peak_rss_mb"] > 0
    versus = next(r for r in records if r["kind"] == "decode_vs_generate")
    assert versus["same_tokens"] and versus["generated_tokens"] == 3
    assert set(versus["per_token_s"]) == {"ours", "ours_no_reserve", "generate"}
    for trace in (r for r in records if r["kind"] == "trace"):
        summary = trace_summary(trace["path"])  # valid JSON with our events per layer
        assert summary["prefill_layer_events"] >= model.config.num_hidden_layers
        assert summary["decode_layer_events"] >= model.config.num_hidden_layers
        assert summary["prune_events"] >= (3 if trace["mode"] == "pruned" else 0)
    assert {(r["mode"], r["runs"]) for r in report["rows"]} == {("dense", 2), ("pruned", 2)}
    assert (tmp_path / "timing_breakdown.md").read_text().count("| float32 | 30 |") == 3
    assert (tmp_path / "timing_breakdown.png").stat().st_size > 0
    # a second invocation appends to the same JSONL (e.g. another dtype) and the reports cover both
    run_profile(engine, tmp_path, [20], 3, 1, 0, 2, 0, 0, 1, meta)
    assert len(json.loads((tmp_path / "timing_breakdown.json").read_text())["rows"]) == 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prune", [False, True])
def test_preallocated_cache_decodes_bit_identically(attn, prune):
    """Reserved buffers, in-place live flags and per-step masks give exactly the logits of the
    concatenating path, also past the reserved capacity and for padded batches."""
    model = tiny_model(attn=attn)
    engine = SDTPEngine(model, tiny_pruner(model))
    ids, mask = left_padded([37, 22, 50], seed=3)
    with torch.inference_mode():
        base = engine.prefill(ids, mask, prune=prune)
    a, b = copy.deepcopy(base.cache), copy.deepcopy(base.cache)
    b.reserve(3)  # fewer than the steps below: the buffers must grow
    assert all(isinstance(layer, ReservedLayer) for layer in b.kv.layers)
    token, positions = base.logits[:, -1].argmax(-1), base.lengths.clone()
    for _ in range(6):
        la = engine.decode_step(a, token, positions)
        lb = engine.decode_step(b, token, positions)
        assert torch.equal(la, lb)
        token, positions = la.argmax(-1), positions + 1
    assert a.layer_lengths() == b.layer_lengths()
    assert torch.equal(a.live_counts(), b.live_counts())
    for la_, lb_ in zip(a.kv.layers, b.kv.layers):
        assert torch.equal(la_.keys, lb_.keys) and torch.equal(la_.values, lb_.values)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_equal_layout_masks(attn):
    model = tiny_model(attn=attn)
    engine = SDTPEngine(model, tiny_pruner(model))
    ids, mask = left_padded([30, 12], seed=5)
    with torch.inference_mode():
        cache = engine.prefill(ids, mask).cache
    cache.reserve(2)
    cache.append_live(1)
    for v, m in zip(cache.segment_valid, cache.decode_masks(attn, model.dtype)):
        ref = layout_mask(v, 1, attn, model.dtype)
        assert (m is None) == (ref is None)
        if ref is not None:
            assert torch.equal(m, ref)


def test_decode_loop_with_and_without_reserve_generates_the_same_tokens():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    ids, mask = left_padded([33, 45], seed=9)
    config = resolve_generation_config(None, max_new_tokens=9, repetition_penalty=1.3)
    with torch.inference_mode():
        base = engine.prefill(ids, mask)
    runs = [
        decode_loop(engine, copy.deepcopy(base.cache), base.logits[:, -1], base.lengths, ids, mask, config, reserve=r)
        for r in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], generate(engine, ids, mask, max_new_tokens=9, repetition_penalty=1.3).sequences)
