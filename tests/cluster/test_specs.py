"""The cluster specs in cluster/: launcher configs validate against the installed Ray's own
autoscaler schema, KubeRay manifests carry what KubeRay needs, and all of them install this
package and agree with the installed Ray version."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
REPO = CLUSTER.parent


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_configs_validate_against_rays_schema(name):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 2, "a 1-GPU and a multi-GPU worker type"
    for node in gpu_types.values():  # autoscaling from zero, with the shape Ray advertises
        assert node["min_workers"] == 0 < node["max_workers"] <= config["max_workers"]
        assert node["resources"]["CPU"] >= 4 * node["resources"]["GPU"], "room for 4 packed clients per GPU"
    assert sorted(v["resources"]["GPU"] for v in gpu_types.values()) == [1, 4]
    assert 0 < config["idle_timeout_minutes"] <= 30
    # The repository is mounted and installed in one pip command; nothing big is synced.
    assert config["file_mounts"] == {"~/cxrfl-ray": "."}
    assert any("pip install" in c and "~/cxrfl-ray" in c for c in config["setup_commands"])
    assert {".venv", "runs"} <= set(config["rsync_exclude"])
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert 8265 in [p["containerPort"] for p in head["ports"]]
    images = {head["image"]}
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] == 0 < group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == group["rayStartParams"]["num-gpus"], "Ray advertises the GPUs the pod has"
    assert len(images) == 1, "head and workers run the same image"


def test_kuberay_manifests_carry_the_required_fields():
    cluster = _manifest("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(cluster["spec"])
    job = _manifest("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "the RayJob brings up the same cluster"
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["cxrfl", "sweep"] and (REPO / args[2]).is_file() and "--resume" in args
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["FLWR_TELEMETRY_ENABLED"] == "0"


def test_the_image_installs_this_package_on_the_pinned_ray():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in lines
    assert any(line.startswith("RUN pip install") and "cxrfl-ray" in line for line in lines)
