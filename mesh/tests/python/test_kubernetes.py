"""The Kubernetes manifests in deploy/kubernetes: valid against the Kubernetes schemas, complete,
and consistent with what the meshserve binary accepts and issues."""

import os
import re
import subprocess

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
