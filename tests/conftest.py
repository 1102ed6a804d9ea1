"""Shared fixtures: tiny models built once, local Ray once, a moto S3 server on 127.0.0.1."""
from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEPT_CALLABLE_DEPRECATION", "1")

import pytest

from pipelines.config import load_config


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny Qwen2.5-VL MLLM and a tiny T5 encoder with random weights, built offline once."""
    from pipelines.synthetic import build_demo_models

    root = tmp_path_factory.mktemp("models")
    mllm = root / "models" / "mllm"
    cfg = load_config("conf/demo.yaml", [f"run_dir={root}", f"models.captioner.name_or_path={mllm}",
                                         f"models.embedder.name_or_path={mllm}",
                                         f"models.describer.name_or_path={mllm}",
                                         "tiny_models.world.lm_steps=0", "tiny_models.world.embedder_steps=0",
                                         # The demo encodes with f_M's text branch; the T5 path is tested too.
                                         "models.text_encoder.kind=t5"])
    build_demo_models(cfg)  # random: the world models are trained by the `synth` stage only
    return {"mllm": str(root / "models" / "mllm"), "t5": str(root / "models" / "t5"), "run_dir": str(root)}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """An untrained tiny prior and adapter (the rank stage's inputs; training is tested elsewhere)."""
    import torch

    from model.prior import ControlAdapter, FusionDiffPrior
    from pipelines.config import plain

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    prior = FusionDiffPrior(d_vl=64, cond_dim=64, **plain(load_config("conf/demo.yaml").prior))
    with torch.no_grad():  # open the zero-initialised gates, as training would
        for p in prior.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prior.save_pretrained(f"{root}/prior")
    ControlAdapter.from_prior(prior).save_pretrained(f"{root}/adapter")
    return f"{root}/prior", f"{root}/adapter"


def tiny_overrides(run_dir, tiny_models, *extra) -> list[str]:
    """key=value overrides of the demo config for a test: its run_dir, the session's tiny models, quiet logs."""
    return [
        f"run_dir={run_dir}",
        f"models.captioner.name_or_path={tiny_models['mllm']}",
        f"models.embedder.name_or_path={tiny_models['mllm']}",
        f"models.describer.name_or_path={tiny_models['mllm']}",
        f"models.text_encoder.name_or_path={tiny_models['t5']}",
        "ray.progress_bars=false",
        # The random tiny models rarely stop by themselves: short outputs keep the tests fast.
        "caption.max_new_tokens_long=12", "caption.max_new_tokens_short=6", "rank.describe_max_new_tokens=16",
        # The tests' catalogue: 48 images (the demo's benchmark has 1,000), training batches to match.
        "synthetic.num_images=48", "synthetic.num_queries=16", "synthetic.num_triplets=32",
        "train_stage1.batch_size=16", "train_stage1.epochs=30", "train_stage2.batch_size=8", "train_stage2.epochs=15",
        # The demo's long fine-tuning and sparse checkpoints are for its 1,000 images.
        "finetune_embedder.epochs=3", "train.checkpoint_every=25",
        *extra,
    ]


def tiny_config(run_dir, tiny_models, *extra):
    """The demo config under `run_dir`, with the session's tiny models and small batches."""
    return load_config("conf/demo.yaml", tiny_overrides(run_dir, tiny_models, *extra))


def run_stage(cfg, name: str, run_id: str | None = None, dry_run: bool = False):
    """Stage `name` of the registry on `cfg`, as the command line runs it; its Summary."""
    from pipelines.context import RunContext
    from pipelines.registry import STAGES

    return STAGES[name].run(RunContext.create(cfg, run_id, dry_run=dry_run))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (real HTTP), with one bucket; yields conf's storage.s3 values."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = {"endpoint": f"http://127.0.0.1:{port}", "region": "us-east-1", "access_key_id": "testing",
          "secret_access_key": "testing", "allow_http": True}
    boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="lake")
    yield s3
    server.stop()
