"""`finetune_embedder`: MVFT-JI's joint contrastive fine-tuning of f_M on Ray Train.

The loss falls on the synthetic world, a rerun resumes, a killed worker's run resumes
from its checkpoint, the export loads through the production loader, LoRA trains only
its targets, `embed` recomputes every vector after a fine-tuning run, and the
fine-tuned embedder retrieves composed queries' targets better than the one it started from.
"""
from __future__ import annotations

import json
import os

import lance
import pytest
import torch
from safetensors.torch import load_file

from model.mllm import FusedEmbedder, embedder_id
from pipelines.config import plain
from tests.conftest import run_stage, tiny_config


def _metrics(path: str) -> list[dict]:
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _mean(rows, key="loss"):
    return sum(r[key] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def lake_dir(tmp_path_factory, tiny_models, ray_local):
    """A run folder whose lake holds the demo's images and captions (and the triplets manifest)."""
    from pipelines.synthetic import synth

    run_dir = tmp_path_factory.mktemp("finetunelake")
    cfg = tiny_config(run_dir, tiny_models)
    synth(cfg)
    for stage in ("ingest", "caption"):
        run_stage(cfg, stage)
    return run_dir


def _cfg(lake_dir, tiny_models, name: str, *extra):
    return tiny_config(lake_dir, tiny_models, "train.log_every=1", f"finetune_embedder.run_name={name}",
                       f"finetune_embedder.base={tiny_models['mllm']}",
                       f"finetune_embedder.output={lake_dir}/out/{name}", *extra)


def finetune(cfg, **faults):
    from pipelines.context import RunContext
    from pipelines.finetune import run

    return run(RunContext.create(cfg), faults=faults)


def _state(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def full(lake_dir, tiny_models):
    """Every weight trained, 10 epochs of the demo's world (48 captions, 32 triplets, batches of 8)."""
    cfg = _cfg(lake_dir, tiny_models, "full", "finetune_embedder.epochs=10")
    return cfg, finetune(cfg)


def test_full_finetuning_learns_exports_and_a_rerun_resumes(full, tiny_models):
    cfg, s = full
    assert (s.read, s.text_to_image_rows, s.target_text_rows) == (80, 48, 32)
    assert (s.resumed_from, s.step, s.total, s.written, s.restarts) == (0, 40, 40, 40, 0)
    rows = _metrics(cfg.finetune_embedder.output)
    assert [r["step"] for r in rows] == list(range(1, 41))
    # In-batch losses (chance: log(8) = 2.08 a task for batches of 8); seen: 4.04 -> 2.57,
    # text-to-image 1.93 -> 1.19, target text 2.11 -> 1.38 (the first and last 8 steps).
    assert _mean(rows[-8:]) < 0.8 * _mean(rows[:8])
    for task in ("loss_text_to_image", "loss_target_text", "loss_pair_to_image"):  # the demo's three
        assert _mean(rows[-8:], task) < 0.85 * _mean(rows[:8], task), task
    out = cfg.finetune_embedder.output
    made_by = json.load(open(os.path.join(out, "finetune.json")))
    assert (made_by["run"], made_by["step"]) == ("full", 40)
    # The export loads through the production loader and gives other vectors than the base.
    conf = plain(cfg.models.embedder)
    base = FusedEmbedder.from_conf({**conf, "name_or_path": tiny_models["mllm"]})
    tuned = FusedEmbedder.from_conf({**conf, "name_or_path": out})
    assert tuned.dim == base.dim == cfg.models.embedder.dim
    texts = ["a small red circle on the left, white background"]
    assert not torch.allclose(tuned.embed(texts=texts), base.embed(texts=texts), atol=1e-3)
    assert embedder_id({**conf, "name_or_path": out}) != embedder_id({**conf, "name_or_path": tiny_models["mllm"]})

    before = _state(out)
    again = finetune(cfg)  # same run name: resumes at its end, trains nothing, exports the same weights
    assert (again.resumed_from, again.step, again.written) == (40, 40, 0)
    after = _state(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_killed_worker_resumes_from_its_checkpoint(lake_dir, tiny_models):
    cfg = _cfg(lake_dir, tiny_models, "faulty", "finetune_embedder.max_steps=8", "train.checkpoint_every=3")
    s = finetune(cfg, fail_at_step=5)
    assert (s.step, s.total, s.restarts) == (8, 8, 1)
    assert os.path.exists(os.path.join(lake_dir, ".injected_failure_finetune_embedder_faulty"))
    # Restarted from the checkpoint at step 3: the count continues, nothing is logged twice.
    assert [r["step"] for r in _metrics(cfg.finetune_embedder.output)] == list(range(1, 9))


def test_lora_trains_only_its_targets_and_merges_into_a_plain_checkpoint(lake_dir, tiny_models):
    cfg = _cfg(lake_dir, tiny_models, "lora", "finetune_embedder.max_steps=6", "finetune_embedder.lora_rank=4",
               "finetune_embedder.lora_targets=[q_proj,v_proj]")
    s = finetune(cfg)
    assert s.step == 6
    base, tuned = _state(tiny_models["mllm"]), _state(cfg.finetune_embedder.output)
    assert sorted(base) == sorted(tuned)  # merged: no LoRA tensor is left in the checkpoint
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    targets = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed and changed <= targets, sorted(changed - targets)


def test_embed_recomputes_every_vector_with_the_finetuned_embedder(full, lake_dir, tiny_models):
    cfg, _ = full
    before = run_stage(tiny_config(lake_dir, tiny_models), "embed")
    assert before.written == 48
    tuned = tiny_config(lake_dir, tiny_models, f"models.embedder.name_or_path={cfg.finetune_embedder.output}")
    after = run_stage(tuned, "embed")
    assert (after.written, after.skipped) == (48, 0)
    models = set(lance.dataset(os.path.join(lake_dir, "lake", "embeddings.lance")).to_table(
        columns=["model"]).column("model").to_pylist())
    assert models == {embedder_id(plain(tuned.models.embedder))}
    assert run_stage(tuned, "embed").written == 0


def test_refusals_before_any_worker_starts(lake_dir, tiny_models):
    from pipelines.ray_train import TrainingError

    cfg = _cfg(lake_dir, tiny_models, "big", "finetune_embedder.batch_size=40")
    with pytest.raises(TrainingError, match=r"32 target-text rows, fewer than one batch \(finetune_embedder"
                                            r".batch_size=40\): needs readable triplets in"):
        finetune(cfg)


def test_the_benchmarks_row_before_finetuning_leaves_the_embeddings_as_they_were(full, lake_dir, tiny_models,
                                                                                  capsys):
    """The benchmark's row of the embedder before fine-tuning embeds the gallery with
    finetune_embedder.base, then restores `embeddings`: the fine-tuned modes find the
    nightly's vectors and embed nothing again."""
    from pipelines import benchmark
    from pipelines.config import load_config
    from pipelines.context import RunContext
    from tests.conftest import tiny_overrides

    cfg, _ = full
    tuned = tiny_overrides(lake_dir, tiny_models, f"models.embedder.name_or_path={cfg.finetune_embedder.output}",
                           f"finetune_embedder.base={tiny_models['mllm']}", "eval.modes=[query_only]",
                           f"eval.out_dir={lake_dir}/eval")
    bench = load_config(["conf/demo.yaml", "conf/eval/demo_cirr.yaml"], tuned)
    run_stage(bench, "embed")  # what the nightly leaves: the fine-tuned embedder's vectors
    uri = os.path.join(lake_dir, "lake", "embeddings.lance")
    kept = lance.dataset(uri).to_table().sort_by([("image_id", "ascending"), ("kind", "ascending")])
    capsys.readouterr()
    benchmark.run(RunContext.create(bench))
    embeds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[embed]")]
    assert [line.split(" in ")[0] for line in embeds] == [
        "[embed] read 48, written 48, skipped as unchanged 0, rejected 0, vectors 96",  # the base embedder's
        "[embed] read 48, written 0, skipped as unchanged 48, rejected 0",
    ]
    after = lance.dataset(uri).to_table().sort_by([("image_id", "ascending"), ("kind", "ascending")])
    assert after.equals(kept)
    results = json.load(open(os.path.join(lake_dir, "eval", "results.json")))
    assert {"query_only (before fine-tuning)", "query_only"} <= set(results)
