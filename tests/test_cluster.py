"""The data stages on a Ray cluster of two local nodes: the actors spread over both
nodes, and the tables equal a one-node run's."""
import json
import os
import subprocess
import sys

import lance
import numpy as np
import pytest

from tests.conftest import run_stage, tiny_config, tiny_overrides


@pytest.mark.drill
def test_two_nodes_share_the_work_and_write_the_tables_one_node_writes(tmp_path, tiny_models, ray_local):
    from pipelines.synthetic import synth

    common = ("synthetic.num_images=24", "synthetic.num_queries=4", "ingest.batch_size=4", "caption.batch_size=4",
              "embed.batch_size=4")
    # One node of 2 CPUs runs one actor a stage (two would leave no CPU for the writer);
    # the cluster's 4 CPUs run two.
    two_actors = ("ingest.num_actors=2", "caption.num_actors=2", "embed.num_actors=2")
    one = tiny_config(tmp_path / "one", tiny_models, *common)
    synth(one)
    for stage in ("ingest", "caption", "embed"):
        run_stage(one, stage)

    overrides = tiny_overrides(tmp_path / "two", tiny_models, *common, *two_actors,
                               f"catalogue.manifest={one.catalogue.manifest}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.cluster_run", *overrides], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("CLUSTER_RUN ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(line.removeprefix("CLUSTER_RUN "))
    assert report["nodes"] == ["head", "worker"]
    assert {s: r["written"] for s, r in report["stages"].items()} == {"ingest": 24, "caption": 24, "embed": 24}
    # Each stage's pool of two actors: at least one stage used both nodes, and between
    # them the stages used both.
    used = [set(nodes) for nodes in report["actors"].values()]
    assert any(u == {"head", "worker"} for u in used), report["actors"]

    def table(root, name, keys, drop=()):
        t = lance.dataset(f"{root}/{name}.lance").to_table()
        return t.drop_columns([c for c in drop if c in t.schema.names]).sort_by([(k, "ascending") for k in keys])

    two_root = f"{tmp_path}/two/lake"
    for name, keys in (("images", ["image_id"]), ("captions", ["image_id"])):
        assert table(one.storage.root, name, keys).equals(table(two_root, name, keys)), name
    a = table(one.storage.root, "embeddings", ["image_id", "kind"])
    b = table(two_root, "embeddings", ["image_id", "kind"])
    assert a.drop_columns(["vector"]).equals(b.drop_columns(["vector"]))
    np.testing.assert_allclose(np.stack(a["vector"].to_numpy(zero_copy_only=False)),
                               np.stack(b["vector"].to_numpy(zero_copy_only=False)), atol=1e-5)
