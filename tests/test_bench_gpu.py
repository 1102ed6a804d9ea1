"""bench/gpu.py checked on CPU at toy size: it runs every variant it is configured with
and records what the GPU sessions read (figures, profiles). The figures mean nothing."""

import json
import subprocess
import sys


def test_gpu_bench_measures_every_attention_variant_and_profiles_on_cpu(tmp_path):
    """bench/gpu.py's embedding and captioning sections at toy size (conf/bench/gpu_tiny.yaml):
    every (workload, variant) measured without error, with its top operators, and the
    captioning split into prefill and decoding."""
    cmd = [sys.executable, "-m", "bench.gpu", "--config", "conf/demo.yaml", "--config", "conf/bench/gpu_tiny.yaml",
           "--device", "cpu", "--dtype", "float32", "--out-dir", str(tmp_path), "--only", "embedding", "captioning"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())["results"]
    rows = results["embedding"]
    assert [r.get("error") for r in rows] == [None] * 6
    assert {(r["workload"], r["vision_attention"]) for r in rows} == {
        (w, a) for w in ("112", "mixed") for a in ("per_image", "padded", "flex")}
    assert all(r["vision_items_per_s"] > 0 and len(r["top_ops"]) == 5 for r in rows)
    # The mixed workload's images differ in shape, so in number of tokens.
    assert {r["image_tokens_mean"] for r in rows if r["workload"] == "mixed"} != {16.0}
    # Prefill and the whole call are timed apart (two medians), so on a busy machine the
    # share can pass 1: the row is checked for its fields, not for a timing's bound.
    for r in results["captioning"]:
        assert r.get("error") is None and r["prefill_s"] > 0 and r["prefill_share"] > 0
        assert isinstance(r["decode_ms_per_step"], float) and r["tokens_per_s"] > 0
