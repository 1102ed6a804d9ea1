"""The command line from end to end, as a user runs it: a fresh run directory, the whole DAG."""
import os
import re
import subprocess
import sys

import lance


def test_nightly_command_builds_the_data_stages_from_nothing(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pipelines", "nightly", "--config", "conf/demo.yaml", f"run_dir={tmp_path}",
           "nightly.stages=[ingest,caption,embed]",           "synthetic.num_images=12", "synthetic.num_queries=3", "synthetic.num_triplets=2", "ray.progress_bars=false",
           # the world models' training is tested on its own (tests/test_world_models.py)
           "tiny_models.world.lm_steps=0", "tiny_models.world.embedder_steps=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("ingest", "caption", "embed"):
        assert re.search(rf"^\[{stage}\] read 12, written 12, skipped as unchanged 0, rejected 0", out.stdout, re.M), out.stdout
    assert lance.dataset(f"{tmp_path}/lake/embeddings.lance").count_rows() == 24
    assert os.path.exists(f"{tmp_path}/models/world_mllm/model.safetensors")
    # This nightly does not fine-tune, so the demo's embedder path (finetune_embedder's
    # output) is where the tiny embedder is built (tests/test_preflight.py: model_source).
    assert os.path.exists(f"{tmp_path}/models/embedder_finetuned/model.safetensors")
    assert os.path.exists(f"{tmp_path}/catalogue/triplets.parquet")


def test_cli_bad_manifest_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pipelines", "ingest", "--config", "conf/demo.yaml", f"run_dir={tmp_path}",
           f"catalogue.manifest={tmp_path}/missing.parquet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert f"error: manifest {tmp_path}/missing.parquet does not exist" in out.stderr
    assert "Traceback" not in out.stderr
