"""`vmbox k8s`: the manifests that run a spec on Kubernetes, for `kubectl apply -f -`.

Registered by vmbox.cli.main. Pure rendering (vmbox.kube.manifests, crd,
install): nothing here talks to a cluster, except `vmbox operator`
(vmbox.kube.operator), which runs against the API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from vmbox.cli.errors import EXIT_USAGE, fail
from vmbox.kube import install
from vmbox.kube.manifests import SYSTEM_NAMESPACE, middlebox, spec_of
from vmbox.spec import SpecError, load_spec, parse_spec

if TYPE_CHECKING:
    from vmbox.state.access import StoreSpec
    from vmbox.state.store import Store


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


@click.command()
@click.option(
    "-n",
    "--namespace",
    default=None,
    help="Reconcile the Middleboxes of this namespace only (default: every namespace).",
)
@click.option(
    "--identity",
    default=None,
    help="This operator's name in the Lease (default: $POD_NAME, else the hostname).",
)
def operator(namespace: str | None, identity: str | None) -> None:
    """Run the Middlebox operator against the cluster until SIGTERM.

    \b
    It connects with the pod's service account (in a pod) or with the
    kubeconfig ($KUBECONFIG or ~/.kube/config), and holds the Lease
    $VMBOX_LEASE (vmbox-operator) in its own namespace ($POD_NAMESPACE,
    else vmbox-system): of several operators one leads and reconciles,
    the others wait to take over. While leading, each pass makes what
    each Middlebox owns (ConfigMap, Deployment of replica pods with image
    $VMBOX_IMAGE, Service, PodDisruptionBudget), publishes its spec to the
    etcd its pods use (the replicas read it there), scales and drains its
    pods and writes its status. SIGTERM gives the Lease up. An API server that
    cannot be reached is one line and exit 1.
    """
    import asyncio
    import os
    import socket

    from vmbox.runtime.kubernetes import KubeError  # lightkube: only for this command

    who = identity or os.environ.get("POD_NAME") or socket.gethostname()
    try:
        asyncio.run(_operate(namespace, who))
    except KubeError as exc:
        fail(str(exc))


def _connect() -> Any:
    """The KubeClient (a seam for the tests)."""
    from vmbox.runtime.kubernetes import KubeClient

    return KubeClient.connect()


async def _operate(namespace: str | None, identity: str) -> None:
    import asyncio
    import os
    import signal

    from vmbox.kube.operator import Operator, Stores

    lease_ns = os.environ.get("POD_NAMESPACE") or SYSTEM_NAMESPACE
    lease = os.environ.get("VMBOX_LEASE") or install.LEASE
    client = _connect()
    try:
        await client.read_lease(lease_ns, lease)  # the API server answers, or one line
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        image = os.environ.get("VMBOX_IMAGE") or install.IMAGE
        stores = Stores(_connect_store)
        op = Operator(
            client,
            namespace,
            identity,
            image=image,
            lease_namespace=lease_ns,
            lease_name=lease,
            stores=stores,
        )
        try:
            await op.run(stop)
        finally:
            await stores.close()
    finally:
        await client.close()


async def _connect_store(target: StoreSpec) -> Store:
    """The etcd a Middlebox's pods use, reached with the operator's mounted Secrets."""
    from vmbox.state import access
    from vmbox.state.etcd import connect

    return await connect(target.endpoints, **access.connect_kwargs(target))
