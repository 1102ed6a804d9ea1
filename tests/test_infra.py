"""The cluster manifests: valid YAML, and every RayJob's entrypoint is a real stage with valid overrides."""
from __future__ import annotations

import glob
import shlex

import pytest
import yaml

from pipelines.registry import STAGES
from pipelines.config import load_config

pytestmark = pytest.mark.fast

MANIFESTS = sorted(glob.glob("infra/k8s/*.yaml"))


def test_manifests_exist():
    names = [m.split("/")[-1] for m in MANIFESTS]
    assert names == ["raycluster.yaml", "rayjob-train-stage1.yaml", "rayjob-train-stage2.yaml"]


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_is_a_kuberay_object_with_a_cpu_head_and_gpu_workers(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if doc["kind"] == "RayJob":
        args = shlex.split(doc["spec"]["entrypoint"])
        assert args[:3] == ["python", "-m", "pipelines"] and args[3] in STAGES
        config = args[args.index("--config") + 1]
        overrides = [a for a in args[args.index("--config") + 2:]]
        cfg = load_config(config, overrides)  # unknown keys or wrong types raise ConfigError
        assert cfg.train.use_gpu and cfg.train.num_workers == spec["workerGroupSpecs"][0]["replicas"]


def test_the_image_installs_the_wheel_not_a_checkout():
    """The Dockerfile builds the package's wheel and installs it (its config layers ship
    inside it), as the wheel test in tests/test_product.py does; no editable install, no
    source tree left behind for `cirpipe` to depend on."""
    with open("infra/Dockerfile") as f:
        steps = f.read()
    assert "pip wheel" in steps and "/tmp/wheels/*.whl" in steps and "cirpipe --version" in steps
    assert "install --no-cache-dir -e" not in steps and "-e ." not in steps
    assert "COPY --chown=ray:users conf" not in steps  # the layers come with the package
