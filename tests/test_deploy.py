"""The deployment artefacts: the Kubernetes manifests render with kustomize, validate against the Kubernetes
schemas offline, pass checkov (each skipped check justified in docs/deployment.md), and say what Stemme needs;
the Dockerfile passes checkov; the container's STEMME_HOME layout verifies the real models without writing
to them. The tools come from .ci/run (.venv/deploy-tools); nothing here is skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
TOOLS = ROOT / ".venv" / "deploy-tools" / "bin"
DOCS = ROOT / "docs" / "deployment.md"
RENDERS = ["", "base", "overlays/gpu", "overlays/hpa-sessions"]
"""Kustomization directories under deploy/k8s ("" is the default deployment)."""
K8S_VERSIONS = ["1.30.0", "1.37.0"]
"""The oldest Kubernetes the manifests target (preStop ``sleep`` is on by default from 1.30) and the newest
schema kubernetes-validate carries."""
PEAK_RSS_MB = 1930
"""Peak RSS of one server with every model, measured in docs/benchmarks.md ("Memory of the whole server")."""
VOICE = {"app.kubernetes.io/name": "stemme", "app.kubernetes.io/component": "voice"}
LLM = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/component": "llm"}


def tool(name: str) -> str:
    """A tool installed by .ci/run, else the one on PATH; a missing tool fails the test (never a skip)."""
    local = TOOLS / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    assert found, f"{name} not found: run .ci/run (it installs the deployment tools into {TOOLS})"
    return found


def run(args: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a tool; checkov is kept from reaching its vendor's API (``--skip-download`` too)."""
    full = {**os.environ, "BC_SKIP_MAPPING": "TRUE", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=full, input=stdin, check=False)


def kubectl() -> str:
    exe = tool("kubectl")
    out = run([exe, "version", "--client"]).stdout
    assert "Kustomize Version: v5" in out, f"{exe} has no kustomize v5 (Debian's kubectl 1.20 is too old): {out}"
    return exe


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    exe = kubectl()
    out: dict[str, str] = {}
    for d in RENDERS:
        p = run([exe, "kustomize", str(K8S / d)])
        assert p.returncode == 0, f"kubectl kustomize deploy/k8s/{d} failed: {p.stderr}"
        out[d] = p.stdout
    return out


def objects(text: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(text) if o]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", q)
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


# -- rendering, schemas, checkov ------------------------------------------------------------------------------
@pytest.mark.parametrize("d", RENDERS)
def test_manifests_validate_against_kubernetes_schemas(rendered: dict[str, str], d: str) -> None:
    exe = tool("kubernetes-validate")
    for version in K8S_VERSIONS:
        p = run([exe, "--strict", "--quiet", "-k", version, "-"], stdin=rendered[d])
        assert p.returncode == 0, f"deploy/k8s/{d} against Kubernetes {version}:\n{p.stdout}{p.stderr}"


def test_validation_catches_a_wrong_field(rendered: dict[str, str]) -> None:
    """The schema check is strict: a misspelt probe field fails (so the clean result above means something)."""
    broken = rendered[""].replace("timeoutSeconds:", "timeoutSecond:", 1)
    p = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0], "-"], stdin=broken)
    assert p.returncode != 0 and "timeoutSecond" in p.stdout + p.stderr


def checkov(path: Path, framework: str) -> dict[str, Any]:
    p = run([tool("checkov"), "-f", str(path), "--framework", framework, "--skip-download",
             "-o", "json"])
    report = json.loads(p.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert p.returncode == 0 and not failed, f"checkov {framework} findings:\n" + "\n".join(failed)
    assert report["summary"]["passed"] > 20, report["summary"]
    return report


def skipped_ids(report: dict[str, Any]) -> set[str]:
    return {c["check_id"] for c in report["results"]["skipped_checks"]}


@pytest.mark.parametrize("d", RENDERS)
def test_checkov_passes_on_rendered_manifests(rendered: dict[str, str], d: str, tmp_path: Path) -> None:
    f = tmp_path / "rendered.yaml"
    f.write_text(rendered[d])
    skipped = skipped_ids(checkov(f, "kubernetes"))
    documented = DOCS.read_text()
    for check in skipped:
        assert check in documented, f"checkov check {check} is skipped but not justified in docs/deployment.md"


def test_checkov_passes_on_dockerfile() -> None:
    report = checkov(ROOT / "Dockerfile", "dockerfile")
    assert not skipped_ids(report) - set(re.findall(r"CKV\w+", DOCS.read_text()))


# -- what the manifests say -----------------------------------------------------------------------------------
def workloads(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objs:
        if o["kind"] == "Deployment":
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o, c


def test_probes_point_at_readyz_and_healthz(rendered: dict[str, str]) -> None:
    d = find(objects(rendered[""]), "Deployment", "stemme")
    c = container(d, "stemme")
    port = c["ports"][0]
    assert port["containerPort"] == 8000 and port["name"] == "http"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"--host", "0.0.0.0"} <= set(c["args"])


@pytest.mark.parametrize("d", RENDERS)
def test_every_pod_runs_non_root_read_only_without_capabilities(rendered: dict[str, str], d: str) -> None:
    for deploy, c in workloads(objects(rendered[d])):
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]


def drain_seconds(c: dict[str, Any]) -> float:
    """The server's drain on SIGTERM: its default, or what the manifest sets."""
    from stemme.streaming.server import ServerConfig

    drain = ServerConfig().shutdown_grace_s
    args = c.get("args", [])
    for flag in ("--drain-grace", "--drain-seconds"):
        if flag in args:
            drain = float(args[args.index(flag) + 1])
    env = env_of(c)
    return float(env.get("STEMME_DRAIN_GRACE_S") or env.get("STEMME_DRAIN_SECONDS") or drain)


@pytest.mark.parametrize("d", RENDERS)
def test_grace_period_exceeds_the_drain_and_the_longest_turn(rendered: dict[str, str], d: str) -> None:
    from stemme.streaming.server import SHUTDOWN_AFTER_DRAIN_S, ServerConfig

    deploy = find(objects(rendered[d]), "Deployment", "stemme")
    c = container(deploy, "stemme")
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    need = pre_stop + drain_seconds(c) + SHUTDOWN_AFTER_DRAIN_S
    assert grace >= need, (grace, pre_stop, drain_seconds(c), SHUTDOWN_AFTER_DRAIN_S)
    assert grace > ServerConfig().max_turn_s


def egress_peers(objs: list[dict[str, Any]], labels: dict[str, str]) -> list[tuple[dict[str, Any], list[Any]]]:
    """(peer, ports) of every egress rule of every policy that selects pods with these labels."""
    out: list[tuple[dict[str, Any], list[Any]]] = []
    for pol in (o for o in objs if o["kind"] == "NetworkPolicy"):
        sel = pol["spec"]["podSelector"].get("matchLabels", {})
        if sel.items() <= labels.items():
            assert "Egress" in pol["spec"]["policyTypes"], pol["metadata"]["name"]
            for rule in pol["spec"].get("egress", []):
                assert rule.get("to"), f"{pol['metadata']['name']}: an egress rule with no 'to' is open egress"
                assert rule.get("ports"), f"{pol['metadata']['name']}: an egress rule must name its ports"
                out += [(peer, rule["ports"]) for peer in rule["to"]]
    return out


def is_dns(peer: dict[str, Any], ports: list[Any]) -> bool:
    return (peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}
            and peer.get("namespaceSelector", {}).get("matchLabels")
            == {"kubernetes.io/metadata.name": "kube-system"}
            and all(p["port"] == 53 for p in ports))


@pytest.mark.parametrize("d", RENDERS)
def test_network_policy_allows_no_egress_but_the_language_model(rendered: dict[str, str], d: str) -> None:
    objs = objects(rendered[d])
    peers = egress_peers(objs, VOICE)
    assert all("ipBlock" not in peer for peer, _ in peers)
    llm = [(peer, ports) for peer, ports in peers if not is_dns(peer, ports)]
    assert all(peer == {"podSelector": {"matchLabels": LLM}} for peer, _ in llm), llm
    url = env_of(container(find(objs, "Deployment", "stemme"), "stemme")).get("STEMME_LLM_URL")
    if d == "base":  # everything in-process: no egress at all
        assert peers == [] and url is None
        return
    assert llm and url, "the default deployment reaches the language model, and only it"
    target = urlparse(url)
    svc = find(objs, "Service", target.hostname or "")
    assert svc["spec"]["selector"] == LLM and svc["spec"]["ports"][0]["port"] == target.port
    assert all(p["port"] == target.port for _, ports in llm for p in ports)
    assert egress_peers(objs, LLM) == [], "the language-model server has no egress either"


def test_resources_follow_the_benchmarks(rendered: dict[str, str]) -> None:
    c = container(find(objects(rendered[""]), "Deployment", "stemme"), "stemme")
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert quantity_bytes(req["memory"]) >= PEAK_RSS_MB * 2**20 * 1.25, "measured peak plus headroom"
    assert quantity_bytes(lim["memory"]) >= quantity_bytes(req["memory"])
    cores = int(req["cpu"])
    env = env_of(c)
    assert all(int(env[f"STEMME_{s}_THREADS"]) <= cores for s in ("ASR", "LLM", "TTS")), env


def test_service_pdb_and_autoscaler_select_the_replicas(rendered: dict[str, str]) -> None:
    objs = objects(rendered[""])
    pod_labels = find(objs, "Deployment", "stemme")["spec"]["template"]["metadata"]["labels"]
    assert find(objs, "Service", "stemme")["spec"]["selector"].items() <= pod_labels.items()
    assert find(objs, "PodDisruptionBudget", "stemme")["spec"]["selector"]["matchLabels"].items() \
        <= pod_labels.items()
    hpa = find(objs, "HorizontalPodAutoscaler", "stemme")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stemme"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2


def test_session_autoscaler_uses_the_servers_metric(rendered: dict[str, str]) -> None:
    from stemme.streaming.metrics import Metrics

    name = Metrics().sessions_active._name
    hpa = find(objects(rendered["overlays/hpa-sessions"]), "HorizontalPodAutoscaler", "stemme")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == name
    assert name in (K8S / "overlays" / "hpa-sessions" / "prometheus-adapter-rules.yaml").read_text()


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image(rendered: dict[str, str]) -> None:
    c = container(find(objects(rendered["overlays/gpu"]), "Deployment", "stemme"), "stemme")
    assert c["image"].endswith("-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(c)["STEMME_DEVICE"] == "cuda"


def test_dockerfile_structure() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3, "multi-stage"
    [user] = re.findall(r"^USER (\S+)", text, re.M)
    assert not user.startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*/readyz", text, re.M | re.S)
    assert "stemme models prepare" in text and "ARG VARIANT=cpu" in text
    for var in ("ORT_DISABLE_TELEMETRY=1", "HF_HUB_OFFLINE=1", "HF_HUB_DISABLE_TELEMETRY=1"):
        assert var in text


# -- the container's STEMME_HOME ------------------------------------------------------------------------------
def test_container_home_links_and_verifies_the_real_models(tmp_path: Path) -> None:
    """The entrypoint's layout over the models prepared by setup.sh: every pack reads as prepared through the
    links, and the prepared models (the image's, in a container) are not written."""
    from stemme.models import packs

    image_home = packs.stemme_home()
    assert (image_home / "packs").is_dir(), "models not prepared: run setup.sh"
    before = {p: p.stat().st_mtime_ns for p in image_home.rglob("*") if p.is_file()}
    home = tmp_path / "home"
    p = run([sys.executable, str(ROOT / "deploy" / "docker" / "stemme_home.py"), "--link", str(image_home),
             str(home)])
    assert p.returncode == 0, p.stderr
    check = ("import json; from stemme.models import packs; "
             "print(json.dumps({p.name: packs.state(p).prepared for p in packs.PACKS if packs.state(p).installed}))")
    q = run([sys.executable, "-c", check], env={"STEMME_HOME": str(home)})
    assert q.returncode == 0, q.stderr
    states = json.loads(q.stdout)
    assert states and all(states.values()), states
    assert (home / "derived").resolve() == (image_home / "derived").resolve()
    after = {p: p.stat().st_mtime_ns for p in image_home.rglob("*") if p.is_file()}
    assert after == before, "the prepared models were written"
