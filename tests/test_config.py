import pytest

from pipelines.__main__ import main
from pipelines.config import ConfigError, load_config


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
