"""The latency report's Markdown table and files (no timing: benchmarks are not tests)."""

import json

from sdtp_core.bench import latency as bench

ROW = {
    "length": 2048,
    "new_tokens": 32,
    "dense_prefill_s": 8.0,
    "pruned_prefill_s": 5.0,
    "dense_e2e_s": 12.0,
    "pruned_e2e_s": 10.0,
    "prefill_speedup": 1.6,
    "flops_ideal_speedup": 1.5,
    "efficiency": 1.6 / 1.5,
    "e2e_speedup": 1.2,
    "compression": 1.53,
    "dense_prefill_tflops": 1.65,
    "pruned_prefill_tflops": 1.1,
    "dense_kv_cache_mb": 24.0,
    "pruned_kv_cache_mb": 16.4,
}
REPORT = {
    "command": "python -m sdtp_core.bench --lengths 2048",
    "machine": {
        "cpu_model": "Test CPU",
        "logical_cpus": 2,
        "cpu_count": 2,
        "cpu_flags": {"avx2": True, "amx_bf16": False},
        "torch": "2.x",
        "transformers": "5.x",
        "loadavg_at_start": [0.5, 0.25, 0.125],
    },
    "settings": {
        "dtype": "torch.float32",
        "attn_implementation": "sdpa",
        "pruner": "random",
        "reps": 3,
        "schedule": {"layers": [4, 6]},
    },
    "peak_rss_mb": 1234.4,
    "rows": [ROW],
}


def test_markdown_row_and_machine():
    md = bench.markdown(REPORT)
    assert "| 2048 | 8.00 | 5.00 | 1.60x | 1.50x | 1.07 | 1.65 | 1.10 | 12.00 | 10.00 | 1.20x | 1.53 | 24 / 16 |" in md
    assert "CPU flags: avx2;" in md and "amx_bf16" not in md
    assert "0.50, 0.25, 0.12" in md and "Peak RSS of the process: 1234 MB" in md
    assert "`python -m sdtp_core.bench --lengths 2048`" in md


def test_from_json_rewrites_markdown_and_plot(tmp_path):
    path = tmp_path / "table2.json"
    path.write_text(json.dumps(REPORT))
    bench.main(["--from-json", str(path)])
    assert path.with_suffix(".md").read_text() == bench.markdown(REPORT)
    assert path.with_suffix(".png").stat().st_size > 0
    assert json.loads(path.read_text()) == REPORT
