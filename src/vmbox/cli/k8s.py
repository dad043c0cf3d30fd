"""`vmbox k8s`: the manifests that run a spec on Kubernetes, for `kubectl apply -f -`.

Registered by vmbox.cli.main. Pure rendering (vmbox.kube.manifests, crd,
install): nothing here talks to a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from vmbox.cli.errors import EXIT_USAGE, fail
from vmbox.kube import install
from vmbox.kube.manifests import middlebox, spec_of
from vmbox.spec import SpecError, load_spec, parse_spec


@click.group()
def k8s() -> None:
    """Run vmbox on Kubernetes: render the Middlebox and the operator's manifests.

    \b
    Install once per cluster, then apply a spec:
      vmbox k8s render --install examples/ratelimit.yaml | kubectl apply -f -
      kubectl get middleboxes
      kubectl scale middlebox web --replicas 3
    The same base is in deploy/ (kubectl apply -k deploy/).
    """


def _read(path: str) -> dict[str, Any]:
    """The YAML spec as data; a file or YAML problem is `vmbox up`'s own SpecError."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        load_spec(path)  # raises the exact line `vmbox up` prints
        raise  # unreachable unless the file changed meanwhile
    if not isinstance(data, dict):
        parse_spec(data, path)  # "expected a mapping of fields"
    return dict(data)


@k8s.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-n", "--namespace", default="default", show_default=True, help="The Middlebox's.")
@click.option(
    "--image",
    default=install.IMAGE,
    show_default=True,
    help="The vmbox image of the operator and, through it, of the replica pods (with --install).",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Start with this many replicas (replicas.count; must lie within min..max).",
)
@click.option(
    "--install",
    "with_install",
    is_flag=True,
    help="Also print the CRD, RBAC, operator and etcd (once per cluster; see deploy/).",
)
def render(spec: str, namespace: str, image: str, replicas: int | None, with_install: bool) -> None:
    """Print the Middlebox for SPEC (a `vmbox up` YAML spec) as YAML for kubectl.

    The spec is checked as `vmbox up` checks it (one line and exit 2 when it is
    wrong) and then as the operator will: `dataplane: relay` only, for now.
    `service:` becomes metadata.name. The operator (see --install) then makes
    the ConfigMap, Deployment, Service and PodDisruptionBudget it owns.
    The etcd TLS and password come from Secrets (vmbox-etcd-tls,
    vmbox-etcd-auth; `pydoc vmbox.kube.install` says how to make them),
    never from the spec.
    """
    try:
        data = _read(spec)
        current = data.get("replicas") or {}
        if replicas is not None and isinstance(current, dict):  # else parse_spec says why
            data["replicas"] = {**current, "count": replicas}
        parse_spec(data, spec)
        mb = middlebox(data, namespace=namespace)
        spec_of(mb)
    except SpecError as exc:
        fail(str(exc), EXIT_USAGE)
    objects = [*install.install_objects(image), mb] if with_install else [mb]
    click.echo(install.to_yaml(objects), nl=False)


@k8s.command(hidden=True)
@click.argument("directory", type=click.Path(file_okay=False))
def deploy(directory: str) -> None:
    """Write the kustomize base and its example into DIRECTORY (deploy/ in the repository)."""
    for name, text in install.deploy_files().items():
        path = Path(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        click.echo(path)
