"""`preflight`: every check OK on the demo config, each problem named on a broken one."""
from __future__ import annotations

import pytest

from pipelines.context import RunContext
from pipelines.preflight import PreflightFailed, model_checks, run
from tests import checkpoints as ck
from tests.conftest import tiny_config


def test_preflight_passes_on_the_demo_config(tmp_path, tiny_models, ray_local, capsys):
    checks = run(RunContext.create(tiny_config(tmp_path, tiny_models)))
    assert checks and all(c.ok for c in checks)
    out = capsys.readouterr().out
    assert "PROBLEM" not in out and f"{len(checks)} OK, 0 problems" in out
    assert not list((tmp_path / "lake" / "_preflight").glob("*"))  # the probe is removed


def test_preflight_names_each_problem_and_its_fix(tmp_path, tiny_models, ray_local, capsys):
    describer_72b = ck.qwen2_5_vl_72b_config(str(tmp_path / "Qwen2.5-VL-72B-Instruct"))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the lake's folder should be")
    cfg = tiny_config(
        tmp_path, tiny_models,
        f"models.captioner.name_or_path={tmp_path / 'missing'}",
        "models.embedder.dim=128",
        f"models.describer.name_or_path={describer_72b}",
        "models.describer.device=cuda",
        "models.describer.dtype=bfloat16",
        "rank.num_gpus_per_actor=1",
        f"storage.root={blocked}/lake",
        "caption.num_gpus_per_actor=1",
        # GPU actors: conf/demo.yaml's tasks would be refused before the preflight runs.
        "ray.model_ops=actors",
    )
    with pytest.raises(PreflightFailed, match="checks found a problem"):
        run(RunContext.create(cfg))
    out = capsys.readouterr().out
    problems = {line.split("  ")[1].strip() for line in out.splitlines() if line.startswith("PROBLEM")}
    assert problems == {
        "models.captioner: config, processor, tokenizer",
        "models.describer: config, processor, tokenizer",  # a config alone: no tokenizer files
        "models.embedder: dim",
        "models.describer: memory",
        "storage.root: reachable, writable",
        "cluster: caption actors",
        "cluster: rank actors",  # the describer's GPU, on a CPU-only Ray
    }, out
    assert "models.embedder.dim is 128" in out
    # ~136 GiB of bfloat16 weights x 1.2 headroom: three 80 GiB GPUs.
    assert "set rank.num_gpus_per_actor >= 3 and models.describer.device_map: auto" in out
    assert "asks for 1 GPU" in out


@pytest.mark.fast
def test_an_embedder_the_nightly_fine_tunes_is_checked_as_its_base(tmp_path, tiny_models):
    """The demo embeds with finetune_embedder's output, which its nightly writes: before the
    first night, preflight and the model builder look at the base it starts from."""
    from pipelines.config import load_config, model_source

    demo = load_config("conf/demo.yaml", [f"run_dir={tmp_path}"])
    assert demo.models.embedder.name_or_path == demo.finetune_embedder.output
    assert model_source(demo, "embedder") == f"{tmp_path}/models/world_embedder"
    assert model_source(demo, "captioner") == f"{tmp_path}/models/world_mllm"
    # Once the stage has written it, the fine-tuned embedder is what is checked.
    (tmp_path / "models" / "embedder_finetuned").mkdir(parents=True)
    (tmp_path / "models" / "embedder_finetuned" / "config.json").write_text("{}")
    assert model_source(demo, "embedder") == demo.finetune_embedder.output
    # A deployment whose nightly does not fine-tune is checked at the path it names.
    other = load_config("conf/demo.yaml", [f"run_dir={tmp_path}/b", "nightly.stages=[ingest,embed]"])
    assert model_source(other, "embedder") == other.finetune_embedder.output
    cfg = tiny_config(tmp_path / "c", tiny_models, f"models.embedder.name_or_path={tmp_path}/c/models/ft",
                      f"finetune_embedder.output={tmp_path}/c/models/ft",
                      f"finetune_embedder.base={tiny_models['mllm']}")
    checks = {c.name: c for c in model_checks(cfg)}
    assert checks["models.embedder: config, processor, tokenizer"].ok
    assert "(finetune_embedder's base)" in checks["models.embedder: config, processor, tokenizer"].detail
    assert checks["models.embedder: dim"].ok
    # The demo's conditions come from the embedder's text branch: checked at the base too.
    assert cfg.models.text_encoder.kind == "mllm"
    assert checks["models.text_encoder: config, tokenizer"].ok, checks["models.text_encoder: config, tokenizer"]
    assert tiny_models["mllm"] in checks["models.text_encoder: config, tokenizer"].detail
