"""k8s/rayservice*.yaml against KubeRay's RayService CRD (v1.7), and their Serve configs against ours."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import config

REPO = Path(__file__).resolve().parents[1]
CRD = REPO.parent / "shared" / "kuberay-crd" / "ray.io_rayservices.yaml"
MANIFESTS = sorted((REPO / "k8s").glob("rayservice*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict:
    if not CRD.is_file():
        pytest.fail(f"{CRD} is missing: the tests need ../shared/kuberay-crd beside the repo")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def test_the_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"rayservice.yaml", "rayservice-70b-pp2.yaml"}


@pytest.fixture(scope="module", params=MANIFESTS, ids=lambda p: p.stem)
def manifest(request) -> dict:
    return yaml.safe_load(request.param.read_text())


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare: Kubernetes prunes them silently, so a typo would vanish."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def test_rayservice_matches_the_crd(manifest, schema):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


def test_the_schema_check_catches_mistakes(manifest, schema):
    broken = yaml.safe_load(yaml.safe_dump(manifest))
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        jsonschema.validate(broken, schema)
    broken = yaml.safe_load(yaml.safe_dump(manifest))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert unknown_fields(broken, schema) == [".spec.rayClusterConfig.headGroupSpec.rayStartParam"]


def test_gpu_workers_and_serve_config(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    (app,) = config.validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]), "serveConfigV2")
    assert app.num_gpus == 1 and app.backend == "cupy"
    # a pod holds a replica's GPUs: one, or one a pipeline stage (STRICT_PACK: the stages on one node)
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(app.pipeline_parallel_size)
    if app.pipeline_parallel_size > 1:
        assert app.placement_strategy == "STRICT_PACK"
        assert float(limits["cpu"]) >= app.num_cpus * (app.pipeline_parallel_size + 1)  # the worker and each stage


def test_ray_ports_guarded(manifest):
    """Ray's ports listen on every interface of a pod: token auth on the cluster, and a
    NetworkPolicy that opens only the API ports (and metrics) beyond the cluster's own pods."""
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    policy = yaml.safe_load((REPO / "k8s" / "networkpolicy.yaml").read_text())
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert {"key": "ray.io/cluster", "operator": "Exists"} in spec["podSelector"]["matchExpressions"]
    open_to_all = [r for r in spec["ingress"] if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in open_to_all] == [[8000, 9000]]
    in_cluster = [r for r in spec["ingress"] if "ports" not in r]
    assert len(in_cluster) == 1 and "podSelector" in in_cluster[0]["from"][0]
    scraped = [p["port"] for r in spec["ingress"] if "from" in r and "ports" in r for p in r["ports"]]
    assert scraped == [8080]
