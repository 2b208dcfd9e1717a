"""deploy/kubernetes, checked without a cluster: every kustomization renders with `kubectl kustomize`, every object is
valid against the Kubernetes API's own schemas (kubernetes-validate, offline, strict: unknown fields are errors), and
the objects say what the server needs: one GPU, probes on /health and /ready, a termination grace that covers the
preStop pause plus the server's drain, DATABASE_URL and API_KEY from Secrets, autoscaling on tts_queue_depth.

KEDA's ScaledObject is a custom resource: kubernetes-validate has no schema for it, so the test checks its fields
itself (the target, the Prometheus trigger, its query) instead of skipping it silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.smoke
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"          # the oldest Kubernetes the manifests are meant for (policy/v1, autoscaling/v2)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed")
        pytest.skip("kubectl is not installed")
    return path


def render(directory: Path) -> list[dict]:
    r = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


def with_components(tmp_path: Path, *components: str) -> Path:
    """A kustomization of the base plus components, as a user's own overlay would be."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "base", tmp_path)],
        "components": [os.path.relpath(KUBE / "components" / c, tmp_path) for c in components],
        "secretGenerator": [{"name": "qwen3-tts-database", "literals": ["DATABASE_URL=postgresql://u@db/tts"],
                             "options": {"disableNameSuffixHash": True}}]}))
    return tmp_path


def validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def server_container(docs: list[dict]) -> dict:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    return {name: render(KUBE / "overlays" / name) for name in ("external-postgres", "trial")}


def test_every_kustomization_renders_and_is_valid_kubernetes(overlays, tmp_path):
    rendered = {**overlays, "base": render(KUBE / "base"), "hpa": render(with_components(tmp_path, "hpa"))}
    for docs in rendered.values():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue                                   # a custom resource: checked field by field below
            validate(doc)
    assert {d["kind"] for d in rendered["hpa"]} >= {"Deployment", "Service", "PodDisruptionBudget",
                                                     "HorizontalPodAutoscaler", "Secret"}


def test_the_validator_is_not_a_rubber_stamp(overlays):
    import kubernetes_validate

    deployment = next(d for d in overlays["external-postgres"] if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45      # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_deployment_fits_the_server(overlays):
    sys.path.insert(0, str(ROOT))
    import server

    for name, docs in overlays.items():
        spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        container = server_container(docs)
        env = env_of(container)
        unknown = set(env) - set(server.ENV_VARIABLES) - {"HF_HOME"}      # HF_HOME: the hub library's own
        assert not unknown, f"{name}: variables the server does not read: {unknown}"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["PRELOAD_MODEL"] == "true"                   # /ready means loaded and warmed up
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "qwen3-tts-database", "key": "DATABASE_URL"}}
        assert env["API_KEY"]["secretKeyRef"]["name"] == "qwen3-tts"
        secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
        assert {"qwen3-tts", "qwen3-tts-database"} <= secrets, secrets
        # SIGTERM comes after preStop; the drain then takes up to DRAIN_TIMEOUT plus the flush of cut streams.
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        drain = float(env["DRAIN_TIMEOUT"])
        assert drain == server.Settings().drain_timeout
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain + server.DRAIN_FLUSH_SECONDS
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/models"] == "models" and env["HF_HOME"] == "/models"
        service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "qwen3-tts")
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        assert service["spec"]["selector"] == next(d for d in docs if d["kind"] == "Deployment")["spec"][
            "selector"]["matchLabels"]
        pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_autoscaling_is_on_requests_queued_or_running_per_replica(overlays, tmp_path):
    scaled = next(d for d in overlays["external-postgres"] if d["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": "qwen3-tts"}
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "tts_queue_depth" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0 and trigger["metadata"]["serverAddress"].startswith("http")
    assert set(scaled["spec"]) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                                   "cooldownPeriod", "advanced", "triggers"}        # fields KEDA v2 knows
    hpa = next(d for d in render(with_components(tmp_path, "hpa")) if d["kind"] == "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "tts_queue_depth" and hpa["spec"]["scaleTargetRef"]["name"] == \
        "qwen3-tts"
    assert "ScaledObject" not in {d["kind"] for d in overlays["trial"]}


def test_the_trial_overlay_brings_its_own_postgresql(overlays):
    docs = overlays["trial"]
    kinds = by_kind(docs)
    (postgres,) = kinds["StatefulSet"]
    assert postgres["spec"]["replicas"] == 1
    assert next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] == 1
    assert "PersistentVolumeClaim" not in kinds                # models in an emptyDir: no RWX storage needed
    db_service = next(d for d in kinds["Service"] if d["metadata"]["name"] == "qwen3-tts-postgres")
    assert db_service["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]
    server_service = next(d for d in kinds["Service"] if d["metadata"]["name"] == "qwen3-tts")
    assert server_service["spec"]["selector"] != db_service["spec"]["selector"]
