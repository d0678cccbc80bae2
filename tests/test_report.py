"""`make bench`'s last step: benchmarks/RESULTS.md from every results file, ratios only."""
from __future__ import annotations

import json
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def test_results_md_has_every_benchmark_and_only_its_ratios(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        import report
    finally:
        sys.path.remove(BENCHMARKS)
    figures = {"raypt_vs_bare_tokens_per_s_1rank": 0.99, "bare_tokens_per_s_1rank": 12345.6, "recovery_s": 17.0,
               "checkpoint_overhead_fraction": 0.0016, "mfu_cpu_vs_matmul_peak": 0.51,
               "pipeline_vs_dp_tokens_per_s": 0.73}
    (tmp_path / "overhead.json").write_text(json.dumps({"date": "2026-12-07", "figures": figures}))
    (tmp_path / "amcl.json").write_text(json.dumps({"date": "2026-12-05", "figures": {"wall_s": 3399}}))
    out = tmp_path / "RESULTS.md"
    report.main(tmp_path, out)
    text = out.read_text()
    assert "## overhead" in text and "## amcl" in text and "papers/amcl.md" in text
    assert "versions: ray" in text and "CPUs" in text
    for name in ("raypt_vs_bare_tokens_per_s_1rank", "checkpoint_overhead_fraction", "mfu_cpu_vs_matmul_peak",
                 "pipeline_vs_dp_tokens_per_s"):
        assert f"`{name}`" in text
    for name in ("bare_tokens_per_s_1rank", "recovery_s", "wall_s"):  # absolute rates and times stay in the JSON
        assert f"`{name}`" not in text
