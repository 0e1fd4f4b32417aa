"""What deploy/ holds: the Kubernetes manifests (valid against the Kubernetes schemas, complete,
and consistent with what the meshserve binary accepts and issues) and the Grafana dashboard
(built on metrics a real node exports)."""

import json
import os
import re
import subprocess
import urllib.request

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, _binary

DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for, and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]


def manifests():
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def resources():
    return [doc for path in manifests() for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization():
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def statefulset():
    (found,) = [r for r in resources() if r["kind"] == "StatefulSet"]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    kinds = set()
    for resource in resources():
        kubernetes_validate.validate(resource, version, strict=True)
        kinds.add(resource["kind"])
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_a_broken_manifest_is_refused_by_the_same_check():
    broken = statefulset()
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest():
    assert sorted(kustomization()["resources"]) == [p.name for p in manifests()]


def test_the_secret_holds_exactly_what_meshserve_certs_issues_for_the_statefulset(tmp_path):
    replicas = statefulset()["spec"]["replicas"]
    names = [f"meshserve-{i}" for i in range(replicas)]
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "k8s-certs.sh"), str(replicas)],
        check=True,
        capture_output=True,
        env={**os.environ, "MESHSERVE_BIN": _binary(), "CERTS_DIR": str(tmp_path / "certs")},
    )
    (generator,) = kustomization()["secretGenerator"]
    listed = generator["files"]
    for name in names:
        assert f"certs/node-{name}/node-{name}.pem" in listed
        assert f"certs/node-{name}/node-{name}.key" in listed
    for path in listed:
        assert (tmp_path / path).is_file(), f"{path} is not made by scripts/k8s-certs.sh"
    assert "ca.key" not in " ".join(listed), "the CA key never goes into the cluster"


def test_the_pods_config_and_arguments_are_what_the_binary_accepts(tmp_path):
    (configmap,) = [r for r in resources() if r["kind"] == "ConfigMap"]
    config = tmp_path / "node.toml"
    config.write_text(configmap["data"]["node.toml"])
    (container,) = statefulset()["spec"]["template"]["spec"]["containers"]
    env = {"POD_NAME": "meshserve-0", "POD_IP": "10.1.2.3"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    args = [str(config) if a == "/etc/meshserve/node.toml" else a for a in args]
    checked = subprocess.run([_binary(), *args, "--check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "config ok" in checked.stdout
    # The same check refuses what a node would refuse.
    wrong = [a.replace("meshserve-0", "Not_A_Node") for a in args]
    bad = subprocess.run([_binary(), *wrong, "--check"], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a node name" in bad.stderr, bad.stderr


def test_probes_point_at_the_oip_health_endpoints_and_the_grace_period_covers_the_drain():
    spec = statefulset()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (configmap,) = [r for r in resources() if r["kind"] == "ConfigMap"]
    node = configmap["data"]["node.toml"]
    grace_ms = int(re.search(r"shutdown_grace_ms = (\d+)", node).group(1))
    drain_ms = int(re.search(r"drain_timeout_ms = (\d+)", node).group(1))
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] * 1000 > pre_stop_s * 1000 + grace_ms + drain_ms


def test_the_grafana_dashboard_queries_only_metrics_a_node_exports(node):
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "meshserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    # Drive a request so every per-model family has a sample.
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32}]})
    request = urllib.request.Request(f"http://{node.url}/v2/models/fraud/infer", data=body.encode(), method="POST")
    urllib.request.urlopen(request).read()
    exposition = urllib.request.urlopen(f"http://{node.url}/metrics").read().decode()
    exported = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        if kind == "histogram":
            exported |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        elif kind == "counter":
            exported.add(f"{family}_total")
        else:
            exported.add(family)
    queried = {name for expr in exprs for name in re.findall(r"\b(meshserve_\w+)", expr)}
    assert queried, exprs
    # Families without samples yet (no plugin ran, no mesh here) are not in the exposition:
    # those must at least be registered under that name by the node's metrics.
    source = (ROOT / "host" / "src" / "metrics" / "mod.rs").read_text()
    registered = set(re.findall(r'registry\.register\(\s*"(\w+)"', source))
    assert {"requests", "queue_depth", "forwarded_requests"} <= registered, registered
    missing = []
    for name in sorted(queried - exported):
        family = re.sub(r"_(total|bucket|sum|count)$", "", name.removeprefix("meshserve_"))
        if family not in registered:
            missing.append(name)
    assert not missing, f"queried but not a metric of the node: {missing}"
    assert {"meshserve_requests_total", "meshserve_request_duration_seconds_bucket"} <= exported
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in exprs:
        for used in re.findall(r"\$(\w+)", expr):
            assert used in variables or used.startswith("__"), f"${used} in {expr}"
