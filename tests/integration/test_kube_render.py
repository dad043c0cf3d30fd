"""`vmbox k8s render` and deploy/, checked offline: no API server here.

Every built-in object validates against the official OpenAPI schemas of
several Kubernetes minor versions (kubernetes-validate, strict: unknown
fields are errors); the Middlebox, a custom object those schemas do not know,
validates against the CRD's own schema (jsonschema) and spec_of. deploy/ must
equal what the code renders, and `kubectl kustomize deploy/` must build it.
What only a cluster can confirm (admission, the CRD's structural check, CEL,
scheduling, the image) is not claimed here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from jsonschema import Draft4Validator  # type: ignore[import-untyped]

from vmbox.kube import crd, install, manifests

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
RELAY_EXAMPLES = [ROOT / "examples" / n for n in ("ratelimit.yaml", "autoscale.yaml", "rules.yaml")]
# Three minor versions a year apart, the oldest still common in managed clusters.
VERSIONS = ("1.28.0", "1.32.0", "1.35.0")
MIDDLEBOX = Draft4Validator(crd.checkable(crd.schema()))


def vmbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbox", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )


def check(doc: dict[str, Any]) -> None:
    """Raise unless `doc` is valid for every version (or, a Middlebox, for the CRD)."""
    if doc["kind"] == manifests.KIND:
        errors = [e.message for e in MIDDLEBOX.iter_errors(doc)]
        assert not errors, errors
        manifests.spec_of(doc)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def test_the_validator_refuses_a_broken_object() -> None:
    """The check is real: a mistyped field and an unknown one are both refused."""
    (deployment,) = [o for o in install.install_objects() if o["kind"] == "Deployment"]
    with pytest.raises(kubernetes_validate.ValidationError):
        check({**deployment, "spec": {**deployment["spec"], "replicas": "two"}})
    with pytest.raises(kubernetes_validate.ValidationError):
        check({**deployment, "spec": {**deployment["spec"], "replica": 2}})
    bad_mb = manifests.middlebox({"service": "web", "listen": "x"})
    with pytest.raises(AssertionError):
        check(bad_mb)


@pytest.mark.parametrize("path", RELAY_EXAMPLES, ids=[p.name for p in RELAY_EXAMPLES])
def test_render_install_prints_valid_manifests(path: Path) -> None:
    result = vmbox("k8s", "render", "--install", "-n", "edge", "--replicas", "2", str(path))
    assert result.returncode == 0, result.stderr
    docs = documents(result.stdout)
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "CustomResourceDefinition" and kinds[-1] == "Middlebox"
    assert {"Namespace", "ClusterRole", "Role", "StatefulSet", "Deployment"} <= set(kinds)
    for doc in docs:
        check(doc)
    assert docs[-1]["spec"]["replicas"]["count"] == 2
    assert docs[-1]["metadata"]["namespace"] == "edge"


@pytest.mark.parametrize("path", RELAY_EXAMPLES, ids=[p.name for p in RELAY_EXAMPLES])
def test_what_the_operator_applies_is_valid(path: Path) -> None:
    mb = manifests.middlebox(yaml.safe_load(path.read_text()), namespace="edge")
    mb["metadata"] |= {"uid": "6b0c5d54-0000-4000-8000-000000000001", "generation": 1}
    for obj in manifests.owned_objects(mb, replicas=3, image=install.IMAGE):
        check(obj)


def test_deploy_is_what_the_code_renders_and_valid() -> None:
    expected = install.deploy_files()
    on_disk = {
        str(p.relative_to(DEPLOY)): p.read_text() for p in DEPLOY.rglob("*.yaml") if p.is_file()
    }
    assert on_disk == expected, "deploy/ drifted: run `vmbox k8s deploy deploy/`"
    for text in on_disk.values():
        for doc in documents(text):
            if doc["kind"] != "Kustomization":
                check(doc)


def test_a_bad_spec_fails_as_vmbox_up_fails(tmp_path: Path) -> None:
    bad = tmp_path / "web.yaml"
    bad.write_text("service: web\nlisten: 127.0.0.1:9000\nupstream: 127.0.0.1:1\nmiddlebox: {}\n")
    render, up = vmbox("k8s", "render", str(bad)), vmbox("up", "--no-live", str(bad))
    assert render.returncode == up.returncode == 2
    assert render.stderr == up.stderr == f"error: {bad}: middlebox.limit: is required\n"
    assert render.stdout == ""
    broken = tmp_path / "broken.yaml"
    broken.write_text("service: [web\n")
    render, up = vmbox("k8s", "render", str(broken)), vmbox("up", "--no-live", str(broken))
    assert (render.returncode, render.stderr) == (up.returncode, up.stderr)
    assert "not valid YAML at line" in render.stderr


def test_in_path_is_refused_in_one_line() -> None:
    result = vmbox("k8s", "render", "examples/inpath.yaml")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not built for Kubernetes" in result.stderr


def test_help_explains() -> None:
    result = vmbox("k8s", "render", "--help")
    assert result.returncode == 0
    assert "kubectl" in result.stdout and "--install" in result.stdout


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_kubectl_kustomize_builds_deploy() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    built = documents(result.stdout)
    expected = install.install_objects()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in expected
    )
    for doc in built:
        check(doc)
