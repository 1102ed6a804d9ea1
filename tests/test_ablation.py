"""The paper's Table 3 in miniature, fast: the full model beats ranking by the query alone.

A shortened run of bench/ablation_synthetic.py (fewer steps, fewer queries) at a fixed
seed; the benchmark itself reports the full-length figures.
"""
from bench.ablation_synthetic import CONFIGS, run_ablation
from pipelines.config import BASE, BENCH_SCHEMA, load_config


def test_full_model_beats_both_ablations(tmp_path):
    cfg = load_config(CONFIGS, [f"run_dir={tmp_path}", "ablation.stage1_steps=400", "ablation.stage2_steps=800",
                                "ablation.batch_size=64", "ablation.num_queries=100"],
                      schemas=(BASE, BENCH_SCHEMA))
    r = run_ablation(cfg, log=lambda line: None)
    assert r["full"]["R@1"] >= r["query_only"]["R@1"] + 15, r
    assert r["full"]["R@5"] >= r["query_only"]["R@5"] + 5, r
    assert r["full"]["R@1"] >= r["prior_only"]["R@1"] + 15, r
    assert r["query_only"]["R@1"] < 60, r  # the world keeps rank-by-query clearly imperfect
