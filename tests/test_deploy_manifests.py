"""Static validation of deploy/docker and deploy/kubernetes (no Docker engine, no cluster here).

What these tests can and cannot prove: they parse every file and check the
fields the deployment depends on (probes, security context, volumes, grace
periods against the config's drain bound, label/selector agreement, that
every file a manifest mounts exists, that each embedded bccguard.toml is
accepted by the real config loader). Where a real tool can run offline it
does: `promtool check config` on the compose Prometheus config, `postconf`
on the Postfix image's build-time configuration, the image's HEALTHCHECK
command against a running relay, and the Kubernetes objects against the API's
own OpenAPI schemas (kubernetes-validate, bundled, offline). They cannot prove a cluster accepts the
objects: `kubectl apply --dry-run=server` was not available on the machine these
tests were written on. The images are built and run for real (podman) in
tests/test_containers.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bccguard.config import from_dict, parse_hostport
from deploy_helpers import RelayProcess, free_port, require_binary, to_toml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "kubernetes"
OPS_FILES = ("deploy/prometheus/alerts.yml", "deploy/grafana/bccguard.json")  # the ops work's files


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(instr: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instr) if k == "FROM")
    return instr[last_from:]


def test_dockerfile_is_slim_non_root_with_volumes_and_healthcheck() -> None:
    instr = dockerfile_instructions(DOCKER / "Dockerfile")
    final = final_stage(instr)
    assert final[0] == ("FROM", "python:3.11-slim")
    users = [v for k, v in final if k == "USER"]
    assert users and users[-1] == "10025:10025", "run as the fixed non-root UID/GID 10025"
    run = " ".join(v for k, v in final if k == "RUN")
    assert "--uid 10025" in run and "--gid 10025" in run
    volumes = [json.loads(v) for k, v in final if k == "VOLUME"]
    assert ["/var/lib/bccguard/quarantine", "/var/lib/bccguard/spool"] in volumes
    exposed = {p for k, v in final if k == "EXPOSE" for p in v.split()}
    assert exposed == {"10025", "9465"}
    (health,) = [v for k, v in final if k == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib.request" in health
    assert json.loads([v for k, v in final if k == "ENTRYPOINT"][-1]) == ["bccguard"]
    cmd = json.loads([v for k, v in final if k == "CMD"][-1])
    assert cmd == ["serve", "--config", "/etc/bccguard/bccguard.toml"]
    # Everything COPY'd from the build context exists (the context is the repository root).
    for k, v in instr:
        if k == "COPY" and "--from" not in v:
            for src in v.split()[:-1]:
                assert (ROOT / src).exists(), src


def image_config() -> dict[str, Any]:
    return tomllib.loads((DOCKER / "bccguard.toml").read_text())


def test_image_config_is_valid_and_matches_the_image() -> None:
    data = image_config()
    cfg = from_dict(data, source="deploy/docker/bccguard.toml")
    assert cfg.quarantine.path == "/var/lib/bccguard/quarantine"
    assert cfg.spool.path == "/var/lib/bccguard/spool"
    assert parse_hostport(cfg.metrics.listen) == ("0.0.0.0", 9465)
    assert parse_hostport(cfg.server.listen)[1] == 10025
    assert cfg.upstream.url == "smtp://postfix:10026"


async def test_the_image_healthcheck_command_works_against_a_running_relay(tmp_path: Path) -> None:
    """Run the HEALTHCHECK's own python -c against a real relay (port changed to a free one)."""
    final = final_stage(dockerfile_instructions(DOCKER / "Dockerfile"))
    (health,) = [v for k, v in final if k == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    port = free_port()
    argv = [a.replace("127.0.0.1:9465", f"127.0.0.1:{port}") for a in argv]
    assert argv[0] == "python"
    cfg = tmp_path / "bccguard.toml"
    cfg.write_text(
        to_toml(
            {
                "server": {"listen": f"127.0.0.1:{free_port()}", "hostname": "bccguard.test"},
                "upstream": {"url": f"maildir:{tmp_path / 'out'}"},
                "quarantine": {"path": str(tmp_path / "q")},
                "spool": {"path": str(tmp_path / "s")},
                "metrics": {"listen": f"127.0.0.1:{port}"},
                "logging": {"format": "json"},
            }
        )
    )

    def run_check() -> int:
        return subprocess.run(
            [sys.executable, *argv[1:]], capture_output=True, timeout=30, check=False
        ).returncode

    relay = RelayProcess(cfg, tmp_path / "relay.log")
    try:
        await relay.astart()
        assert await asyncio.to_thread(run_check) == 0
    finally:
        await relay.astop()
    assert await asyncio.to_thread(run_check) != 0, "with the relay gone the check must fail"


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_whole_flow() -> None:
    c = compose()
    services = c["services"]
    assert {"postfix", "bccguard", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this laptop"

    b = services["bccguard"]
    assert b["user"] == "10025:10025"
    assert b["read_only"] is True and b["cap_drop"] == ["ALL"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in b["volumes"]}
    assert mounts["/var/lib/bccguard/quarantine"] in c["volumes"], "quarantine on a named volume"
    assert mounts["/var/lib/bccguard/spool"] in c["volumes"], "spool on a named volume"
    assert mounts["/etc/bccguard/bccguard.toml"] == "./bccguard.toml"
    test = b["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/healthz" in part for part in test)
    grace = float(re.fullmatch(r"(\d+)s", b["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    assert grace > image_config()["server"]["shutdown_timeout"]

    # The wiring: Postfix's content filter points at the bccguard service, bccguard back at Postfix.
    assert image_config()["upstream"]["url"] == "smtp://postfix:10026"
    assert services["prometheus"]["depends_on"]["bccguard"]["condition"] == "service_healthy"

    # Every bind-mounted file or directory and every build context/Dockerfile exists
    # (the ops work's files are checked once they are merged).
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = (DOCKER / build["context"]).resolve()
            assert (ctx / build["dockerfile"]).is_file(), name
        for m in svc.get("volumes", []):
            src = m.split(":")[0]
            if src.startswith((".", "/")):
                path = (DOCKER / src).resolve()
                rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
                if rel in OPS_FILES and not path.exists():
                    continue
                assert path.exists(), f"{name} mounts {src}, which does not exist"


def test_compose_grafana_provisioning() -> None:
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/bccguard.yml").read_text())
    (provider,) = dash["providers"]
    mounted = [
        m.split(":")[1]
        for m in compose()["services"]["grafana"]["volumes"]
        if m.split(":")[0].endswith(".json")
    ]
    assert any(Path(m).parent == Path(provider["options"]["path"]) for m in mounted)
    board = ROOT / "deploy/grafana/bccguard.json"
    if board.exists():  # the ops work's dashboard
        assert json.loads(board.read_text())["title"]


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_binary("promtool", package="prometheus")
    alerts = ROOT / "deploy/prometheus/alerts.yml"
    if not alerts.exists():
        pytest.skip("deploy/prometheus/alerts.yml (the ops work) is not on this branch yet")
    shutil.copy(DOCKER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(alerts, tmp_path / "alerts.yml")
    r = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "bccguard"  # alerts.yml's BccguardDown looks for it
    assert job["static_configs"][0]["targets"] == ["bccguard:9465"]


def test_postfix_image_configuration_with_postconf(tmp_path: Path) -> None:
    """The Postfix image's configure.sh, run on a temporary directory, read back with postconf."""
    postconf = require_binary("postconf", package="postfix")
    conf = tmp_path / "postfix"
    conf.mkdir()
    master_dist = Path("/usr/share/postfix/master.cf.dist")
    if not master_dist.exists():
        pytest.skip("no /usr/share/postfix/master.cf.dist to start from")
    env = {**os.environ, "CONF": str(conf), "SNIPPETS": str(ROOT / "deploy/postfix")}
    r = subprocess.run(
        ["sh", str(DOCKER / "postfix/configure.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr

    def q(*args: str) -> str:
        out = subprocess.run([postconf, "-c", str(conf), *args], capture_output=True, text=True, check=True)
        assert "warning" not in out.stderr, out.stderr
        return out.stdout.strip()

    assert q("content_filter") == "content_filter = bccguard:[bccguard]:10025"
    assert q("receive_override_options") == "receive_override_options = no_address_mappings"
    assert q("relayhost") == "relayhost = [mailpit]:1025"
    reinject = q("-P", "10026/inet/content_filter")
    assert reinject == "10026/inet/content_filter ="
    assert "bccguard" in q("-M", "bccguard/unix")
    # The Dockerfile copies exactly what configure.sh reads.
    dockerfile = (DOCKER / "postfix/Dockerfile").read_text()
    assert (
        "deploy/postfix/main.cf.after-queue" in dockerfile
        and "deploy/postfix/master.cf.after-queue" in dockerfile
    )
    assert shlex.split("postfix start-fg") == json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]


# ---------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def k8s_config() -> dict[str, Any]:
    (cm,) = by_kind("ConfigMap")
    return tomllib.loads(cm["data"]["bccguard.toml"])


def test_every_manifest_has_the_basics() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PersistentVolumeClaim",
        "Kustomization",
    } <= kinds
    for d in docs:
        assert d.get("apiVersion"), d["__file__"]
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"], d["__file__"]
            assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "bccguard", d["__file__"]
    kust = by_kind("Kustomization")[0]
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res


def test_configmap_holds_a_config_bccguard_accepts() -> None:
    cfg = from_dict(k8s_config(), source="deploy/kubernetes/configmap.yaml")
    assert parse_hostport(cfg.metrics.listen)[0] == "0.0.0.0", "the kubelet probes from outside the pod"


def test_workload_pod_spec() -> None:
    (w,) = by_kind("StatefulSet")
    spec = w["spec"]
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    pod = spec["template"]["spec"]
    cfg = k8s_config()

    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10025 and psc["fsGroup"] == 10025
    (c,) = pod["containers"]
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["smtp"] == parse_hostport(cfg["server"]["listen"])[1]
    assert ports["metrics"] == parse_hostport(cfg["metrics"]["listen"])[1]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("metrics", ports["metrics"])

    # Grace: SIGKILL only after preStop's pause and bccguard's own drain bound.
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(pre)).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] > pause + cfg["server"]["shutdown_timeout"]

    # Config mounted from the ConfigMap where the args point; state where the config points.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert c["args"] == ["serve", "--config", "/etc/bccguard/bccguard.toml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes[mounts["/etc/bccguard"]]["configMap"]["name"] == by_kind("ConfigMap")[0]["metadata"]["name"]
    )
    assert mounts[cfg["quarantine"]["path"]] == "quarantine"
    assert mounts[cfg["spool"]["path"]] == "spool"
    assert "/tmp" in mounts, "read-only root: give Python a writable /tmp"
    pvcs = {p["metadata"]["name"]: p for p in by_kind("PersistentVolumeClaim")}
    pvc = pvcs[volumes["quarantine"]["persistentVolumeClaim"]["claimName"]]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "one quarantine volume shared by the replicas"
    # ... but one quarantine directory per relay (ops/instance.py refuses a second): each pod
    # mounts its own sub-directory, named after the pod.
    (qmount,) = [m for m in c["volumeMounts"] if m["name"] == "quarantine"]
    assert qmount["subPathExpr"] == "$(POD_NAME)" and "subPath" not in qmount
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The spool: one per replica, never shared (see test_no_two_relays_share_a_spool).
    assert "spool" not in volumes, "the spool comes from volumeClaimTemplates, one PVC per replica"
    (tmpl,) = spec["volumeClaimTemplates"]
    assert tmpl["metadata"]["name"] == "spool" and tmpl["spec"]["accessModes"] == ["ReadWriteOnce"]


def kustomized() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/kubernetes` creates (not the one-off files beside them)."""
    (kust,) = by_kind("Kustomization")
    files = {res.split("#")[0].strip() for res in kust["resources"]}
    return [d for d in k8s_docs() if d["__file__"] in files]


def test_no_two_relays_share_a_spool() -> None:
    """A spool directory belongs to one relay: a second is refused at start (ops/instance.py).

    Two replicas of a Deployment sharing one ReadWriteMany spool PVC crash-looped
    every replica after the first; per-pod sub-directories under a Deployment
    would strand a removed pod's spooled mail under a random name that never
    comes back. So the relay is a StatefulSet: stable names, one spool PVC each.
    """
    objs = kustomized()
    workloads = [
        d for d in objs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod")
    ]
    assert [(d["kind"], d["__file__"]) for d in workloads] == [("StatefulSet", "statefulset.yaml")]
    cfg = k8s_config()
    # Nothing in the directory, applied by -k or not, may put the relay in a replicated
    # workload whose pods have no stable name to find their spool again.
    for d in k8s_docs():
        if d["kind"] in ("Deployment", "DaemonSet", "ReplicaSet"):
            pytest.fail(f"{d['__file__']}: a {d['kind']} would share or strand a spool")
    (sts,) = [d for d in objs if d["kind"] == "StatefulSet"]
    spec = sts["spec"]
    # A scale-down or a deletion must never take a spool PVC with it: mail answered 250 may sit there.
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    assert (
        retention.get("whenScaled", "Retain") == "Retain"
        and retention.get("whenDeleted", "Retain") == "Retain"
    )
    # Rolling update replaces one pod at a time, the old one gone (its flocks released)
    # before its namesake starts on the same PVC: the StatefulSet default, spelled out.
    strategy = spec.get("updateStrategy", {"type": "RollingUpdate"})
    assert strategy["type"] == "RollingUpdate"
    assert strategy.get("rollingUpdate", {}).get("maxUnavailable", 1) == 1
    # No PVC in the kustomization for a spool: the only spool claims are the per-replica ones.
    (c,) = spec["template"]["spec"]["containers"]
    spool_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == cfg["spool"]["path"])
    assert "subPath" not in spool_mount and "subPathExpr" not in spool_mount
    claimed = {
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claimed == {"bccguard-quarantine"}
    assert {d["metadata"]["name"] for d in objs if d["kind"] == "PersistentVolumeClaim"} == {
        "bccguard-quarantine"
    }


def test_hpa_never_scales_down_on_its_own() -> None:
    """A removed ordinal's spool PVC stays behind with whatever it held: only an admin
    following the README's drain steps should remove a replica, not the HPA at 3 a.m."""
    (sts,) = by_kind("StatefulSet")
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "StatefulSet",
        sts["metadata"]["name"],
    )
    assert hpa["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"
    assert hpa["spec"]["minReplicas"] == sts["spec"]["replicas"], (
        "the StatefulSet starts where the HPA starts"
    )


def test_spool_drain_pod_delivers_a_left_behind_spool_without_taking_clients() -> None:
    """spool-drain.yaml: the one-off pod the README gives for a removed ordinal's spool PVC.

    It must run the relay's own `serve` (its retrier delivers a spool it starts
    on at once, store/spool.py + retry.py), on the same config and spool path, on
    an existing spool claim, and must not be selected by the Service (no clients),
    the PDB or the PodMonitor; and it is not part of `kubectl apply -k`.
    """
    (pod,) = [d for d in by_kind("Pod") if d["__file__"] == "spool-drain.yaml"]
    assert "spool-drain.yaml" not in {d["__file__"] for d in kustomized()}
    (sts,) = by_kind("StatefulSet")
    relay = sts["spec"]["template"]["spec"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    (rc,) = relay["containers"]
    assert c["args"] == rc["args"] and c["image"] == rc["image"]
    assert (
        spec["securityContext"] == relay["securityContext"] and c["securityContext"] == rc["securityContext"]
    )
    cfg = k8s_config()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/bccguard"]["name"]]["configMap"]["name"] == "bccguard-config"
    claim = volumes[mounts[cfg["spool"]["path"]]["name"]]["persistentVolumeClaim"]["claimName"]
    tmpl = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert re.fullmatch(rf"{tmpl}-{sts['metadata']['name']}-\d+", claim), claim
    # Its own quarantine directory on the shared volume (a relay needs one; the console sees it).
    q = mounts[cfg["quarantine"]["path"]]
    assert volumes[q["name"]]["persistentVolumeClaim"]["claimName"] == "bccguard-quarantine"
    assert q.get("subPathExpr") == "$(POD_NAME)" or q.get("subPath")
    assert "/tmp" in mounts
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget", "PodMonitor"):
        (obj,) = by_kind(kind)
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        assert not sel.items() <= labels.items(), f"the drain pod must not be picked by the {kind}"


@pytest.mark.parametrize("version", ["1.27.0", "1.33.0"])
def test_manifests_match_the_kubernetes_api_schema(version: str) -> None:
    """Every object, against the API's own OpenAPI schema, offline (no cluster here).

    kubernetes-validate (Apache-2.0) bundles the schemas kubectl would fetch from a
    server; strict mode refuses unknown fields, the typo a YAML parse lets through
    and an API server would reject or silently drop. 1.27: the oldest release where
    a StatefulSet's PVC retention policy is on by default; 1.33: a current one.
    PodMonitor is a CRD (Prometheus Operator) with no bundled schema.
    """
    kv = pytest.importorskip("kubernetes_validate")
    checked = set()
    for d in k8s_docs():
        if d["kind"] in ("Kustomization", "PodMonitor"):
            continue
        obj = {k: v for k, v in d.items() if k != "__file__"}
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{d['__file__']}: {d['kind']} {version}: {exc}")
        checked.add(d["kind"])
    assert {"StatefulSet", "HorizontalPodAutoscaler", "Pod", "PersistentVolumeClaim"} <= checked


def test_service_pdb_hpa_podmonitor_select_the_pods() -> None:
    (sts,) = by_kind("StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (svc,) = by_kind("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    pod_ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= pod_ports
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("StatefulSet", sts["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica the PDB would block every drain"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pm,) = by_kind("PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in pod_ports and ep["path"] == "/metrics"
