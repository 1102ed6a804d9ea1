import pytest

from pipelines.__main__ import main
from pipelines.config import BASE, BENCH_SCHEMA, RULES, ConfigError, load_config

pytestmark = pytest.mark.fast


def test_demo_and_prod_load_with_their_models():
    demo = load_config("conf/demo.yaml")
    # A relative run_dir is made absolute where the config is loaded (Ray workers run elsewhere).
    import os

    assert demo.storage.root == os.path.abspath("runs/demo/lake")
    assert demo.models.embedder.dim == demo.tiny_models.mllm.hidden_size
    prod = load_config("conf/prod.yaml")
    assert prod.models.embedder.dim == 1536
    assert prod.models.captioner.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert prod.models.describer.name_or_path == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert prod.storage.root.startswith("s3://")


def test_overrides_apply_and_interpolate():
    cfg = load_config("conf/demo.yaml", ["run_dir=/tmp/x", "caption.batch_size=3", "embed.pair_short_fraction=1"])
    assert cfg.storage.root == "/tmp/x/lake"
    assert cfg.caption.batch_size == 3
    assert cfg.embed.pair_short_fraction == 1


@pytest.mark.parametrize("override, words", [
    ("caption.batchsize=3", ["unknown key", "caption.batchsize"]),
    ("nosuch.section.key=1", ["unknown key", "nosuch"]),
    ("caption.batch_size=many", ["caption.batch_size", "must be int", "many"]),
    ("ray.progress_bars=maybe", ["ray.progress_bars", "must be bool"]),
    ("caption", ["not key=value"]),
])
def test_bad_overrides_are_refused_with_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("conf/demo.yaml", [override])
    for w in words:
        assert w in str(e.value)


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match="bad.yaml.*embed.batch_sise"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["ingest", "--config", "conf/demo.yaml", "ingest.batch_size=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ingest.batch_size" in err and "Traceback" not in err


# One case per kind of rule, and the degenerate values a tester tried:
# each is refused at load, before Ray starts, with the key, the value and what is allowed.
@pytest.mark.parametrize("override, message", [
    ("sampling.sampler=foo", "sampling.sampler='foo': expected one of dpmsolver++, ddpm"),
    ("rank.mode=fancy", "rank.mode='fancy': expected one of full, query_only, prior_only, joint, text"),
    ("rank.search=fuzzy", "rank.search='fuzzy': expected one of exact, ann"),
    ("caption.kv_cache=paged", "caption.kv_cache='paged': expected one of dynamic, static, static_compiled"),
    ("models.embedder.vision_attention=varlen",
     "models.embedder.vision_attention='varlen': expected one of per_image, padded, flex"),
    ("models.embedder.dtype=fp8", "models.embedder.dtype='fp8': expected one of float32, float16, bfloat16"),
    ("models.describer.device=tpu", "models.describer.device='tpu': expected cpu, cuda or cuda:<n>"),
    ("rank.batch_size=0", "rank.batch_size=0: expected >= 1"),
    ("ingest.batch_size=0", "ingest.batch_size=0: expected >= 1"),
    ("ingest.batch_size=-1", "ingest.batch_size=-1: expected >= 1"),
    ("caption.batch_size=0", "caption.batch_size=0: expected >= 1"),
    ("caption.num_actors=0", "caption.num_actors=0: expected >= 1"),
    ("embed.batch_size=0", "embed.batch_size=0: expected >= 1"),
    ("rank.top_k=-5", "rank.top_k=-5: expected >= 1"),
    ("rank.top_k=0", "rank.top_k=0: expected >= 1"),
    ("embed.pair_short_fraction=1.5", "embed.pair_short_fraction=1.5: expected in [0, 1]"),
    ("diffusion.p_cfg=-0.1", "diffusion.p_cfg=-0.1: expected in [0, 1]"),
    ("train_stage1.ema_decay=1.0", "train_stage1.ema_decay=1.0: expected in [0, 1)"),
    ("nightly.stages=[ingest,captoin]", "nightly.stages=['ingest', 'captoin']: expected a list of ingest, caption"),
    ("eval.modes=[full,best]", "eval.modes=['full', 'best']: expected a list of full"),
    ("train.num_workers=3", "train_stage1.batch_size=128: expected a multiple of train.num_workers=3"),
    ("prior.num_heads=5", "prior.hidden_size=64: expected a multiple of prior.num_heads=5"),
    ("index.num_sub_vectors=7", "index.num_sub_vectors=7: expected a divisor of models.embedder.dim=64"),
    ("models.embedder.image_max_pixels=100", "models.embedder.image_max_pixels=100: expected >= models.embedder"),
    ("train.use_gpu=yes", "train.use_gpu takes true or false, not 'yes'"),
    ("ray.progress_bars=off", "ray.progress_bars takes true or false, not 'off'"),
    ("ray.num_cpus=many", "ray.num_cpus='many': expected >= 1"),
    ("finetune_embedder.caption_column=alt", "finetune_embedder.caption_column='alt': expected one of"),
    ("finetune_embedder.temperature=0", "finetune_embedder.temperature=0: expected > 0"),
    ("finetune_embedder.output=s3://lake/m", "finetune_embedder.output='s3://lake/m': expected a filesystem path"),
    ("finetune_embedder.batch_size=0", "finetune_embedder.batch_size=0: expected >= 1"),
    ("ray.model_ops=threads", "ray.model_ops='threads': expected one of actors, tasks"),
    ("embed.num_gpus_per_actor=1", "embed.num_gpus_per_actor=1: expected 0 with ray.model_ops=tasks"),
])
def test_values_outside_their_rules_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("conf/demo.yaml", [override])
    assert message in str(e.value)


def test_every_rule_names_keys_of_the_schema():
    from pipelines.config import _matching
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(BASE), OmegaConf.load(BENCH_SCHEMA))
    for pattern in RULES:
        assert list(_matching(cfg, pattern)), f"rule {pattern!r} matches no key of conf/base.yaml"


def test_benchmark_and_fault_knobs_are_not_in_the_pipeline_schema():
    with pytest.raises(ConfigError, match="unknown key 'gpu_bench'"):
        load_config("conf/demo.yaml", ["gpu_bench.budget_s=1"])
    with pytest.raises(ConfigError, match="unknown key 'train.fail_at_step'"):
        load_config("conf/demo.yaml", ["train.fail_at_step=3"])
    bench = load_config(["conf/demo.yaml", "conf/bench/gpu_tiny.yaml"], schemas=(BASE, BENCH_SCHEMA))
    assert bench.gpu_bench.out_dir == "runs/bench/gpu"


def test_the_cli_refuses_a_bad_value_before_ray_starts(tmp_path):
    """The command exits 2 with one line, and no Ray session was ever started (Ray's
    temp dir, pointed at an empty folder, stays empty)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, RAY_TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "pipelines", "rank", "--config", "conf/demo.yaml",
                          f"run_dir={tmp_path}/run", "sampling.sampler=foo"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr == "error: sampling.sampler='foo': expected one of dpmsolver++, ddpm\n"
    assert os.listdir(tmp_path) == []


def test_relative_paths_on_the_command_line_are_taken_from_where_the_config_is_loaded(tmp_path, monkeypatch):
    # Ray Train's workers run in folders of their own: a relative model folder reached
    # them as a path under the worker's folder and was refused there.
    import os

    monkeypatch.chdir(tmp_path)
    os.makedirs("models/base_embedder")
    cfg = load_config(BASE.parent / "demo.yaml", [
        "run_dir=/abs/run", "train_stage1.output=runs/p1", "finetune_embedder.base=models/base_embedder",
        "models.captioner.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct", "catalogue.queries=q.parquet",
    ])
    assert cfg.train_stage1.output == str(tmp_path / "runs/p1")
    # The interpolation follows: Stage 2's prior is the folder Stage 1 wrote.
    assert cfg.train_stage2.prior == str(tmp_path / "runs/p1")
    assert cfg.finetune_embedder.base == str(tmp_path / "models/base_embedder")
    assert cfg.catalogue.queries == str(tmp_path / "q.parquet")
    # A name that is no folder here stays a hub id, and ${run_dir} paths stay under run_dir.
    assert cfg.models.captioner.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert cfg.storage.root == "/abs/run/lake"
    assert load_config(BASE.parent / "prod.yaml").storage.root.startswith("s3://")
