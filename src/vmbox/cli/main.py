"""The `vmbox` command: up, status, scale, set, apply, delete, demo, experiment, echo, load, ...

Behaves like the tools operators know: --help that explains, one clear line
and a non-zero exit for every error the user can cause (bad spec, unreachable
etcd, busy port), never a traceback for those.
"""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial
from typing import Any

import click
from rich.console import Console

from vmbox import context
from vmbox.cli.errors import EXIT_USAGE, fail, run
from vmbox.cli.experiment import experiment
from vmbox.cli.k8s import k8s, operator
from vmbox.cli.lab import lab
from vmbox.cli.options import ETCD_HELP, access_options, etcd_endpoints, parse_address_option
from vmbox.spec import SpecError, load_spec
from vmbox.state import access
from vmbox.state.access import StoreSpec
from vmbox.state.store import StoreError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """vmbox runs network middleboxes as elastic groups of replicas whose
    shared state lives in etcd.

    \b
    Try it:   vmbox demo
    Run:      vmbox up examples/ratelimit.yaml [more specs ...]
    Inspect:  vmbox status        Resize: vmbox scale web 3
    Change:   vmbox set web limit 50      vmbox apply web.yaml
    Remove:   vmbox delete web
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="vmbox: %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument(
    "specs", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False)
)
@click.option("--etcd", help="Use these etcd endpoints instead of the specs' store.")
@click.option("--live/--no-live", default=True, help="Live status table (default on a terminal).")
@click.option(
    "--metrics-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the controller's Prometheus /metrics (0: any free port; "
    "`vmbox status` shows it). Binds the spec's metrics_host.",
)
def up(specs: tuple[str, ...], etcd: str | None, live: bool, metrics_port: int) -> None:
    """Run the services described by the SPEC files until Ctrl-C.

    Starts a private etcd when the specs say `store: managed` (one for all of
    them), writes each spec and desired count to etcd, starts the replicas as
    child processes (crashed ones are restarted with backoff) and shows their
    status. With an `autoscale:` section, the controller samples every
    replica's memory, CPU and traffic and adds or drains replicas within
    replicas.min..max. As root with replicas.memory_limit set, each replica
    runs in its own memory cgroup with that limit, as a pod would. While it
    runs, `vmbox apply` changes a service or adds one, and `vmbox delete`
    removes one. Ctrl-C stops every replica and the private etcd.
    """
    from vmbox.service import run_services

    loaded = [load_spec_or_fail(path) for path in specs]
    run(lambda: run_services(loaded, etcd_endpoints(etcd), live, metrics_port))


def load_spec_or_fail(path: str) -> Any:
    try:
        return load_spec(path)
    except SpecError as exc:
        fail(str(exc), EXIT_USAGE)


@main.command()
@click.argument("service", required=False)
@click.option("--etcd", help=ETCD_HELP)
@click.option("-w", "--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@access_options
def status(
    service: str | None, etcd: str | None, watch: bool, settings: dict[str, str | None]
) -> None:
    """Show a service's replicas, shares, per-second traffic and recent events.

    Without SERVICE, list every running service one line each (replicas
    ready of desired, how many run its current spec, limit, packets per
    second), then, when there is only one, its replicas. The etcd, and its
    TLS and user settings, are the ones `vmbox up` recorded unless given here.
    """
    from vmbox.cli.status import show_all, show_status

    if service is None and not watch:
        targets = _all_targets(etcd, settings)
        shown = run(lambda: show_all(targets))
        if len(shown) != 1:
            return
        service = shown[0]
        etcd = etcd or None
    name, target = _target(service, etcd, settings)
    run(lambda: show_status(name, target, watch))


@main.command()
@click.argument("service")
@click.argument("replicas", type=click.IntRange(min=0))
@click.option("--etcd", help=ETCD_HELP)
@access_options
def scale(service: str, replicas: int, etcd: str | None, settings: dict[str, str | None]) -> None:
    """Set the desired replica count of SERVICE; a running `vmbox up` follows within a second."""
    from vmbox.cli.status import set_desired

    name, target = _target(service, etcd, settings)
    run(lambda: set_desired(name, target, replicas))


@main.command(name="set")
@click.argument("service")
@click.argument("item")
@click.argument("value")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the fence (default: the lease TTL + 3 s).",
)
@click.option("--etcd", help=ETCD_HELP)
@access_options
def set_(
    service: str,
    item: str,
    value: str,
    timeout: float | None,
    etcd: str | None,
    settings: dict[str, str | None],
) -> None:
    """Set a shared state item of SERVICE live: `vmbox set web limit 50`.

    \b
    ITEM is a shared item (`limit`, `rules.NAME.limit`) or a rule's NAME
    (its limit). VALUE is checked as the replicas check it (a limit is an
    integer from 0, which admits nothing, to 10^9).

    Under `consistency: fenced` the command returns only when every live
    replica has acknowledged the new value, or has lost its lease (a replica
    cut off from etcd stops admitting under the item within half the lease
    TTL, before its lease can expire); it prints how long that took and which
    replicas acked or were fenced out, and exits 1 if that takes longer than
    --timeout. Under other modes the value is written and the replicas pick it
    up by themselves (not fenced). A value written with etcdctl is picked up
    too, but nobody waits for it.
    """
    from vmbox.cli.setitem import SetError, set_item

    name, target = _target(service, etcd, settings)
    try:
        run(lambda: set_item(name, target, item, value, timeout))
    except SetError as exc:
        fail(str(exc), exc.code)


@main.command()
@click.argument(
    "specs", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False)
)
@click.option("--dry-run", is_flag=True, help="Show the changes; write nothing.")
@click.option("--host", help="The `vmbox up` to run a new service (when several use the etcd).")
@click.option("--etcd", help=ETCD_HELP)
@access_options
def apply(
    specs: tuple[str, ...],
    dry_run: bool,
    host: str | None,
    etcd: str | None,
    settings: dict[str, str | None],
) -> None:
    """Change running services to match the SPEC files, or add new ones.

    \b
    Each spec is compared with the one its service runs, and the changes are
    shown first, as `kubectl diff` does:
      live        limits (middlebox.limit, a rule's limit): written to their
                  state keys; under consistency: fenced, apply waits for the
                  fence as `vmbox set` does
      controller  replicas.*, autoscale.*: the controller follows at once
      rollout     what replicas read at start (consistency, rules, algorithm,
                  fail, ...): replicas are replaced one at a time, one more
                  started first, so never fewer serve than desired
      refused     listen, upstream, dataplane, gateway, function, window,
                  store, metrics_host, replicas.memory_limit: the spec is
                  refused, nothing written (delete the service, apply it anew)
    A spec that changes nothing writes nothing. A new service is added to
    the running `vmbox up` (the one started last; --host names another) and
    apply returns once its controller runs.
    """
    from vmbox.cli.apply import apply_spec
    from vmbox.cli.setitem import SetError

    loaded = [load_spec_or_fail(path) for path in specs]
    for spec in loaded:
        target, recorded = _apply_target(spec, etcd, settings)
        try:
            run(partial(apply_spec, spec, target, host, dry_run, recorded))
        except SetError as exc:
            fail(str(exc), exc.code)


@main.command()
@click.argument("service")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the replicas to drain and the service to go.",
)
@click.option("--etcd", help=ETCD_HELP)
@access_options
def delete(service: str, timeout: float, etcd: str | None, settings: dict[str, str | None]) -> None:
    """Drain and remove SERVICE from the `vmbox up` that runs it.

    Its replicas finish the flows in flight (replicas.drain_timeout), leave
    and exit; then its keys (spec, state, events) are deleted from etcd. The
    other services of that `vmbox up` go on.
    """
    from vmbox.cli.apply import delete_service
    from vmbox.cli.setitem import SetError

    name, target = _target(service, etcd, settings)
    try:
        run(lambda: delete_service(name, target, timeout))
    except SetError as exc:
        fail(str(exc), exc.code)


def _apply_target(
    spec: Any, etcd: str | None, given: dict[str, str | None]
) -> tuple[StoreSpec, str | None]:
    """Where to apply `spec`: --etcd, else the spec's own external store, else the etcd
    of the `vmbox up` running its service, else of the one started last; and that
    `vmbox up`'s host name when this machine recorded it."""
    flags = {field: value for field, value in given.items() if value is not None}
    if etcd:
        try:
            return access.from_settings(context.parse_endpoints(etcd), flags), None
        except StoreError as exc:
            fail(str(exc), EXIT_USAGE)
    if isinstance(spec.store, StoreSpec) and not context.recorded_host(spec.service):
        return spec.store, None
    try:
        name, endpoints, recorded = context.lookup_settings(spec.service)
    except context.NoContext:
        try:
            name, endpoints, recorded = context.lookup_settings(None)
        except context.NoContext:
            fail(
                f"{spec.service}: no running `vmbox up` to apply it to: start one "
                "(`vmbox up SPEC`) or pass --etcd"
            )
    try:
        return access.from_settings(endpoints, recorded | flags), context.recorded_host(name)
    except StoreError as exc:
        fail(str(exc), EXIT_USAGE)


def _all_targets(
    etcd: str | None, given: dict[str, str | None]
) -> list[tuple[StoreSpec, list[str]]]:
    """Every etcd a running `vmbox up` recorded (or --etcd), with the services recorded."""
    flags = {field: value for field, value in given.items() if value is not None}
    try:
        if etcd:
            return [(access.from_settings(context.parse_endpoints(etcd), flags), [])]
        found: dict[str, tuple[StoreSpec, list[str]]] = {}
        for name, endpoints, recorded in context.running():
            key = ",".join(endpoints)
            if key not in found:
                found[key] = (access.from_settings(endpoints, recorded | flags), [])
            found[key][1].append(name)
    except StoreError as exc:
        fail(str(exc), EXIT_USAGE)
    if not found:
        fail("no running `vmbox up` recorded an etcd: pass --etcd HOST:PORT")
    return list(found.values())


def _target(
    service: str | None, etcd: str | None, given: dict[str, str | None]
) -> tuple[str, StoreSpec]:
    """The service and how to reach its etcd: flags first, then what `vmbox up` recorded."""
    if etcd:
        if not service:
            fail("name the SERVICE when you pass --etcd", EXIT_USAGE)
        recorded: dict[str, str] = {}
        name, endpoints = service, context.parse_endpoints(etcd)
    else:
        try:
            name, endpoints, recorded = context.lookup_settings(service)
        except context.NoContext as exc:
            fail(str(exc))
    flags = {field: value for field, value in given.items() if value is not None}
    try:
        return name, access.from_settings(endpoints, recorded | flags)
    except StoreError as exc:
        fail(str(exc), EXIT_USAGE)


@main.command()
@click.option("--duration", default=90.0, show_default=True, help="Seconds the whole run may take.")
@click.option(
    "--dataplane",
    type=click.Choice(["relay", "nfqueue"]),
    default="relay",
    show_default=True,
    help="relay: the UDP relay on loopback. nfqueue (root): in the packet path of a lab "
    "of network namespaces it builds and removes, with a UDP and a TCP client.",
)
def demo(duration: float, dataplane: str) -> None:
    """The reference experiment in one command.

    A private etcd, an echo server, a ratelimit service at 100 packets/s (under
    the reference design's `split: even`; a spec's default is `demand`) and a
    client ramping from 10 to 300 packets/s; the service is scaled 1 -> 2 -> 4
    replicas during the run. Ends with a summary table. With --dataplane
    nfqueue the service sits in a lab's gateway and two clients (hping3, UDP
    and TCP) offer 300 packets/s each; tcpdump counts what the server got.
    """
    from vmbox.demo import run_demo, run_inpath_demo
    from vmbox.lab import LabError
    from vmbox.labclients import require_inpath

    if duration < 20:
        fail("--duration must be at least 20 seconds", EXIT_USAGE)
    if dataplane == "relay":
        run(lambda: run_demo(duration, Console()))
        return
    try:
        require_inpath("vmbox demo --dataplane nfqueue")
        run(lambda: run_inpath_demo(duration, Console()))
    except LabError as exc:
        fail(str(exc))


main.add_command(experiment)
main.add_command(lab)
main.add_command(k8s)
main.add_command(operator)


@main.command()
@click.option("--listen", required=True, help="HOST:PORT to echo on.")
@click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False), help="Write second,received rows here."
)
@click.option(
    "--duration", type=float, help="Stop after this many seconds (default: until Ctrl-C)."
)
def echo(listen: str, csv_path: str | None, duration: float | None) -> None:
    """A UDP echo server that reports datagrams received per second."""
    from vmbox.tools.echo import echo_main

    address = parse_address_option(listen, "--listen")
    run(lambda: echo_main(address, csv_path, duration))


@main.command()
@click.option("--target", required=True, help="HOST:PORT to send to (the service address).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Packets per second.")
@click.option("--ramp", help="FROM:TO:STEP_PER_S, e.g. 10:300:20.")
@click.option(
    "--sources",
    default=1,
    show_default=True,
    type=click.IntRange(1, 253),
    help="Distinct source addresses 127.0.0.2 ...",
)
@click.option(
    "--flows",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="UDP flows (source ports), spread over the sources.",
)
@click.option(
    "--duration", default=10.0, show_default=True, type=click.FloatRange(0, 3600, min_open=True)
)
def load(
    target: str, rate: float | None, ramp: str | None, sources: int, flows: int, duration: float
) -> None:
    """Send a bounded UDP load and report per second what was sent and what came back."""
    from vmbox.tools.load import LoadPlan, load_main

    if (rate is None) == (ramp is None):
        fail("give exactly one of --rate and --ramp", EXIT_USAGE)
    ramp_tuple = _ramp(ramp) if ramp else None
    address = parse_address_option(target, "--target")
    try:  # the plan validates flows against sources and the like, in one line each
        LoadPlan(address, rate, ramp_tuple, sources, flows, duration)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    run(lambda: load_main(address, rate, ramp_tuple, sources, flows, duration))


def _ramp(value: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(part) for part in value.split(":"))
    except ValueError:
        raise click.BadParameter(
            "expected FROM:TO:STEP_PER_S, e.g. 10:300:20", param_hint="--ramp"
        ) from None
    if start <= 0 or stop <= 0 or step < 0:
        raise click.BadParameter("rates must be positive", param_hint="--ramp")
    return start, stop, step


@main.command(hidden=True)
@click.option("--service", required=True)
@click.option("--id", "replica_id", required=True)
@click.option("--etcd", required=True)
@click.option("--metrics-port", default=0, type=int)
@click.option("--parent-pid", type=int, help="Exit (SIGINT) when this parent process dies.")
@click.option("--standby", is_flag=True, help="A warm spare: serve nothing until promoted.")
@access_options
def replica(
    service: str,
    replica_id: str,
    etcd: str,
    metrics_port: int,
    parent_pid: int | None,
    standby: bool,
    settings: dict[str, str | None],
) -> None:
    """Run one replica (started by a runtime, not by hand)."""
    from vmbox.proc import exit_with_parent

    # SIGINT, not SIGTERM: with its parent gone (and the private etcd with it) there is
    # nothing to drain toward, so the replica leaves at once.
    if parent_pid is not None and not exit_with_parent(parent_pid, signal.SIGINT):
        fail(f"parent process {parent_pid} is gone; not starting")
    from vmbox.replica import ReplicaConfigError, replica_main
    from vmbox.runtime.base import EXIT_CONFIG

    logging.getLogger().setLevel(logging.INFO)
    try:
        target = access.from_settings(context.parse_endpoints(etcd), settings)
        code = run(lambda: replica_main(service, replica_id, target, metrics_port, standby))
    except (ReplicaConfigError, access.AccessError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(code)
