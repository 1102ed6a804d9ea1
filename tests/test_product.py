"""What a user meets first: the installed package, the README's own-catalogue commands and
snippets, preflight's checks of their tables, the results page run alone, and images with
transparency."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config import CONF_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small outputs of the random tiny models keep the runs short (as tests/conftest.py does).
QUICK = ["caption.max_new_tokens_long=12", "caption.max_new_tokens_short=6", "rank.describe_max_new_tokens=16",
         "ray.progress_bars=false"]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def fake_demo_run(root: Path, tiny_models: dict, checkpoints: tuple) -> None:
    """The folders `make demo` leaves under runs/demo that conf/catalogue.yaml reads:
    the world MLLM, the fine-tuned embedder and the lake's prior and adapter (here the
    suite's random tiny ones: the flow is under test, not the models' quality)."""
    models, lake_models = root / "runs/demo/models", root / "runs/demo/lake/models"
    models.mkdir(parents=True)
    lake_models.mkdir(parents=True)
    for name in ("world_mllm", "embedder_finetuned"):
        shutil.copytree(tiny_models["mllm"], models / name)
    shutil.copytree(checkpoints[0], lake_models / "prior")
    shutil.copytree(checkpoints[1], lake_models / "adapter")


@pytest.mark.fast
def test_the_readme_is_short_and_has_the_sections_a_user_acts_on():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for title in ("The two commands", "Install", "Your own catalogue", "A real deployment", "Configuration",
                  "Development"):
        assert f"\n## {title}" in text, title
    assert "chance (random ranking)" in readme_section("The two commands")


@pytest.mark.fast
def test_shipped_layers_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ here
    assert load_config("demo").synthetic.enabled
    assert load_config("conf/prod.yaml").storage.root.startswith("s3://")
    assert load_config(["demo", "eval/demo_cirr"]).eval.benchmark == "cirr"
    with pytest.raises(ConfigError, match="none of the shipped layers.*catalogue.*demo.*prod"):
        load_config("nope.yaml")
    mine = tmp_path / "mine.yaml"
    mine.write_text("rank:\n  top_k: 7\n")
    assert load_config(["demo", str(mine)]).rank.top_k == 7


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path, tiny_models):
    """`pip wheel` of the project, installed into a new environment that sees the suite's
    installed dependencies but not its editable checkout, runs `cirpipe` from an empty folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("model", "ops", "pipelines"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True)
    wheel = next((tmp_path / "dist").glob("fusiondiff_pipeline-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # The suite's dependencies as a plain path entry: its .pth files (the editable
    # checkout's finder among them) are not run from there.
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "ray").is_dir())
    (site / "suite_dependencies.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin/python"), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1")
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True)
    where = subprocess.run([str(env_dir / "bin/python"), "-c", "import pipelines; print(pipelines.__file__)"], **run)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    version = subprocess.run([str(env_dir / "bin/cirpipe"), "--version"], **run)
    assert version.returncode == 0 and version.stdout.strip() == "cirpipe 0.1.0", version.stdout + version.stderr
    models = [f"models.{role}.name_or_path={tiny_models['mllm']}" for role in ("captioner", "describer")]
    preflight = subprocess.run([str(env_dir / "bin/cirpipe"), "preflight", "--config", "demo",
                                f"run_dir={elsewhere / 'run'}", *models,
                                f"finetune_embedder.base={tiny_models['mllm']}", "ray.num_cpus=1"], **run)
    assert preflight.returncode == 0, preflight.stdout + preflight.stderr
    assert re.search(r"\[preflight\] \d+ OK, 0 problems", preflight.stdout)
    assert "drawn by the synth stage" in preflight.stdout


def test_the_readme_own_catalogue_commands_and_snippets_run(tmp_path, tiny_models, checkpoints, monkeypatch):
    """The README's section, as written: copy the template, preflight, the nightly, then
    both snippets reading the rankings back; on the shipped three-row example tables."""
    fake_demo_run(tmp_path, tiny_models, checkpoints)
    (tmp_path / "conf").symlink_to(CONF_DIR)  # the checkout's conf/ the README's paths name
    section = readme_section("Your own catalogue")
    commands = [line for block in code_blocks(section, "sh") for line in block.splitlines() if line.strip()]
    assert [c.split()[0] for c in commands] == ["cp", "cirpipe", "cirpipe"]
    outputs = []
    for command in commands:
        argv = command.split()
        if argv[0] == "cirpipe":
            argv = [str(BIN / "cirpipe"), *argv[1:], *QUICK]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    assert re.search(r"\[preflight\] \d+ OK, 0 problems", outputs[1])
    assert "catalogue.queries" in outputs[1] and "train_stage2.output" in outputs[1]
    assert "[ingest] read 3, written 3" in outputs[2] and "[rank] read 3, written 3" in outputs[2]
    # Quiet by default: the stages' lines, not Ray's or Lance's own logs.
    night = done.stdout + done.stderr
    assert "Execution plan" not in night and "WARN  lance" not in night and " INFO " not in night, night
    assert (tmp_path / "runs/catalogue/report/index.html").exists()
    monkeypatch.chdir(tmp_path)
    for snippet in code_blocks(section, "python"):
        printed = io.StringIO()
        monkeypatch.setattr(sys, "stdout", printed)
        exec(compile(snippet, "README.md", "exec"), {})
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        assert printed.getvalue().strip(), snippet
    import pyarrow.dataset as ds

    top = ds.dataset(tmp_path / "runs/catalogue/lake/rankings", format="parquet", partitioning="hive").to_table()
    assert set(top.column("query_id").to_pylist()) == {"q1", "q2", "q3"} and top.num_rows == 3 * 2  # the other two images each


def test_preflight_checks_the_tables_and_nightly_refuses_a_missing_prior_before_any_stage(
        tmp_path, tiny_models, checkpoints, ray_local):
    from pipelines import nightly, preflight
    from pipelines.common import ManifestError, check_inputs
    from model.checkpoints import CheckpointMismatch

    fake_demo_run(tmp_path, tiny_models, checkpoints)
    (tmp_path / "conf").symlink_to(CONF_DIR)
    os.chdir(tmp_path)
    try:
        layers = ["demo", "catalogue"]
        cfg = load_config(layers, QUICK)
        checks = {c.name: c for c in preflight.input_checks(cfg)}
        assert checks["catalogue.manifest"].ok and "image_id, uri, caption" in checks["catalogue.manifest"].detail
        assert checks["train_stage2.output"].ok
        (tmp_path / "bad.csv").write_text("query_id,text\nq1,make it red\n")
        bad = load_config(layers, [*QUICK, f"catalogue.queries={tmp_path / 'bad.csv'}"])
        [check] = preflight.input_checks(bad)
        assert not check.ok and "has no column 'modification_text'" in check.detail and "bad.csv" in check.detail
        with pytest.raises(ManifestError, match="does not exist"):
            check_inputs(load_config(layers, [f"catalogue.manifest={tmp_path}/none.csv"]), ["ingest"])
        (tmp_path / "noref.csv").write_text("query_id,modification_text\nq1,make it red\n")
        with pytest.raises(ManifestError, match="neither 'reference_id' nor 'reference_uri'"):
            check_inputs(load_config(layers, [f"catalogue.queries={tmp_path}/noref.csv"]), ["rank"])
        # rank.mode=full with no prior: refused by nightly before its first stage writes anything.
        no_prior = load_config(layers, [*QUICK, f"train_stage1.output={tmp_path}/no_prior"])
        with pytest.raises(CheckpointMismatch, match="rank.mode=full needs the prior at train_stage1.output"):
            nightly.run(no_prior)
        assert not (tmp_path / "runs/catalogue/lake/images.lance").exists()
        # query_only needs no checkpoint at all.
        assert check_inputs(load_config(layers, [f"train_stage1.output={tmp_path}/no", "rank.mode=query_only"]),
                            ["rank"])[0][0] == "catalogue.queries"
    finally:
        os.chdir(ROOT)


@pytest.mark.fast
def test_transparent_pixels_take_the_configured_background():
    from ops.images import decode_image

    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (8, 8, 24, 24))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    white = decode_image(buf.getvalue(), "white")
    assert white.mode == "RGB" and white.getpixel((0, 0)) == (255, 255, 255) and white.getpixel((16, 16)) == (255, 0, 0)
    assert decode_image(buf.getvalue(), "#00ff00").getpixel((0, 0)) == (0, 255, 0)
    opaque = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(opaque, format="PNG")
    assert decode_image(opaque.getvalue(), "white").getpixel((0, 0)) == (1, 2, 3)
    assert load_config("demo").images.alpha_background == "white"


@pytest.mark.fast
def test_thumbnail_names_are_safe_and_their_src_is_url_escaped():
    from pipelines.report import _figure, thumb_name

    for image_id in ("a b", "ünï/cöde", "../../etc/passwd", "a b"):
        name = thumb_name(image_id)
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.jpg", name) and not name.startswith("."), name
    assert thumb_name("a b") != thumb_name("a_b")
    html = _figure("thumbs/a b ü.jpg", "cap", False)
    assert 'src="thumbs/a%20b%20%C3%BC.jpg"' in html


def test_report_alone_shows_the_newest_ranked_run(tmp_path, tiny_models, checkpoints, ray_local):
    from pipelines.context import RunContext
    from pipelines.registry import STAGES

    fake_demo_run(tmp_path, tiny_models, checkpoints)
    (tmp_path / "conf").symlink_to(CONF_DIR)
    os.chdir(tmp_path)
    try:
        cfg = load_config(["demo", "catalogue"], [*QUICK, "rank.mode=query_only"])
        for stage in ("ingest", "caption", "embed"):
            STAGES[stage].run(RunContext.create(cfg, "prep"))
        STAGES["rank"].run(RunContext.create(cfg, "older"))
        STAGES["rank"].run(RunContext.create(cfg, "newest"))
        summary = STAGES["report"].run(RunContext.create(cfg))  # a new run id, as `cirpipe report` makes
        assert summary.written == 1 and "/newest/index.html" in summary.note
        page = (tmp_path / "runs/catalogue/report/newest/index.html").read_text()
        assert "not ranked" not in page and page.count("<figure") > 3
        named = STAGES["report"].run(RunContext.create(cfg, "older"))
        assert "/older/index.html" in named.note
    finally:
        os.chdir(ROOT)
