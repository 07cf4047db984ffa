"""cluster.yaml through Ray's own autoscaler code, and the KubeRay RayJob's required fields."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.autoscaler.v2.utils import ResourceRequestUtil
from ray.core.generated.autoscaler_pb2 import ResourceRequest

REPO = Path(__file__).resolve().parent.parent
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
MODEL_ACTOR = {"CPU": 1, "GPU": 1}  # what pipeline._accelerator_resources asks per model actor


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """As `ray up` sees it: merged with the AWS defaults, then schema-validated."""
    config = prepare_config(copy.deepcopy(cluster))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validation(prepared):
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in types
    for name, node_type in types.items():
        assert node_type["resources"], f"{name} must declare its resources"
        assert "max_workers" in node_type and "InstanceType" in node_type["node_config"]


def test_head_does_no_work_and_workers_are_gpu_nodes_that_scale_from_zero(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    gpus = {t["resources"].get("GPU", 0) for t in workers.values()}
    assert gpus == {1, 8}
    for name, worker in workers.items():
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1, name
        assert worker["node_config"]["IamInstanceProfile"]["Arn"], name  # S3 through the instance role


def test_spot_types_have_an_on_demand_fallback_of_the_same_shape(prepared):
    workers = [t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]]
    spot = [t for t in workers if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [t for t in workers if "InstanceMarketOptions" not in t["node_config"]]
    assert spot and on_demand
    for fallback in on_demand:
        twins = [t for t in spot if t["resources"] == fallback["resources"]]
        assert twins and all(t["priority"] > fallback["priority"] for t in twins)


def test_image_setup_and_no_secrets(cluster, prepared):
    assert prepared["docker"]["image"] == IMAGE and prepared["docker"]["container_name"]
    assert any("pip install" in command and "dataset-factory" in command for command in cluster["setup_commands"])
    assert {".git", "outputs"} <= set(cluster["rsync_exclude"])
    text = (REPO / "cluster.yaml").read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "AKIA"):
        assert secret.lower() not in text.lower()


def _launches(node_types, requests: int, shape: dict, **availability) -> dict[str, int]:
    """What the v2 autoscaler (the default of `ray up`) would launch for pending requests."""
    demand = ResourceRequestUtil.group_by_count([ResourceRequest(resources_bundle=shape)] * requests)
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=node_types, resource_requests=demand,
        **availability))
    assert not reply.infeasible_resource_requests
    launched: dict[str, int] = {}
    for launch in reply.to_launch:
        launched[launch.instance_type] = launched.get(launch.instance_type, 0) + launch.count
    return launched


def test_autoscaler_starts_spot_gpu_nodes_and_falls_back_to_on_demand(cluster):
    node_types = AutoscalingConfig(copy.deepcopy(cluster), skip_content_hash=True).get_node_type_configs()
    assert _launches(node_types, 4, MODEL_ACTOR) == {"gpu.1x.spot": 4}
    # A spot type that just failed to allocate is passed over for its on-demand twin.
    assert _launches(node_types, 2, MODEL_ACTOR,
                     recoverable_resource_availabilities={"gpu.1x.spot": 0.0}) == {"gpu.1x.ondemand": 2}
    # CPU-only stages (encode, write) need a worker too: the head offers no CPU.
    assert _launches(node_types, 1, {"CPU": 0.5}) == {"gpu.1x.spot": 1}


@pytest.fixture(scope="module")
def rayjob() -> dict:
    documents = [d for d in yaml.safe_load_all((REPO / "k8s" / "rayjob.yaml").read_text()) if d]
    (job,) = [d for d in documents if d["kind"] == "RayJob"]
    return job


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/build_dataset.py"]
    assert entrypoint[entrypoint.index("--recipe") + 1] == "voc-oracle"
    assert entrypoint[entrypoint.index("--out") + 1].startswith("s3://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] == IMAGE
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})

    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] and "rayStartParams" in group
    assert group["minReplicas"] == 0 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"] == IMAGE
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayjob_reaches_s3_through_a_service_account_role(rayjob):
    documents = [d for d in yaml.safe_load_all((REPO / "k8s" / "rayjob.yaml").read_text()) if d]
    (account,) = [d for d in documents if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            assert not any("AWS_SECRET" in e.get("name", "") for e in container.get("env", []))
