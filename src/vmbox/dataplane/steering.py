"""Steering: which replica's netfilter queue each forwarded packet of an in-path service goes to.

Written by the controller (vmbox.control.controller) into the gateway network
namespace with iptables (the nf_tables backend here; nft's own `queue`
statement is not on this kernel, iptables' NFQUEUE and HMARK targets are,
through xt compat). One chain per service, jumped to from FORWARD:

    -A FORWARD [-i IFACE] -j VMBOX-<service>
    -A VMBOX-<service> -j HMARK --hmark-tuple src,dst,sport,dport,proto --hmark-mod N ...
    -A VMBOX-<service> -m mark --mark 0 -j NFQUEUE --queue-num Q0 [--queue-bypass]
    ...

HMARK hashes the 5-tuple (`spread: flow`) or the address pair and protocol
(`spread: addresses`, what NFQUEUE's own --queue-balance hashes on) into a
mark 0..N-1, symmetric in the two directions, and mark i goes to the i-th
serving queue in order. A resize replaces the whole chain in one
`iptables-restore --noflush` transaction per family (a declared chain is
flushed and refilled atomically), so no packet sees a half-written chain;
hash mod N moves most flows when N changes (as Kubernetes' Service moves
connections that are new), which the resize guard and the shares already
allow for. `--queue-bypass` (spec `fail: open`) passes a packet whose queue
nobody has bound; without it the kernel drops it (`closed`, `static`).

`Steering` and `restore_text` are pure; `install`, `apply` and `remove` run
iptables inside the namespace (vmbox.netns.exec_argv).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from vmbox import netns

FAMILIES = ("iptables", "ip6tables")
HMARK_SEED = 0x766D6278  # "vmbx": every gateway hashes alike, so a flow's replica is stable
TUPLES = {"flow": "src,dst,sport,dport,proto", "addresses": "src,dst,proto"}
CHAIN_MAX = 28  # iptables' limit on a chain name
TIMEOUT = 10.0


class SteeringError(OSError):
    """iptables refused or is missing; str() is one line."""


def chain_name(service: str) -> str:
    """VMBOX-<service>, shortened with a digest when the name would pass 28 characters."""
    name = f"VMBOX-{service}"
    if len(name) <= CHAIN_MAX:
        return name
    digest = hashlib.sha1(service.encode()).hexdigest()[:8]
    return f"VMBOX-{service[: CHAIN_MAX - 15]}-{digest}"


def replica_number(service: str, replica_id: str) -> int:
    """n of replica `<service>-<n>` (n >= 1); a ValueError for any other id."""
    suffix = replica_id.removeprefix(f"{service}-")
    if suffix == replica_id or not suffix.isdigit() or int(suffix) < 1:
        raise ValueError(f"replica id {replica_id!r} is not {service}-<n>")
    return int(suffix)


def queue_of(service: str, replica_id: str, first: int) -> int:
    """The queue replica `<service>-<n>` consumes: first + n - 1."""
    return first + replica_number(service, replica_id) - 1


@dataclass(frozen=True, slots=True)
class Steering:
    """What one service's chain says: the serving queues, in order, and how to hash."""

    chain: str
    queues: tuple[int, ...]  # serving replicas' queues; empty: none serves yet
    fallback: int  # the queue packets go to when none serves (nobody bound: bypass or drop)
    bypass: bool  # fail: open
    spread: str = "flow"

    def rules(self) -> list[str]:
        """The chain's rules as iptables-restore lines (without the -A CHAIN prefix)."""
        bypass = " --queue-bypass" if self.bypass else ""
        if len(self.queues) <= 1:
            queue = self.queues[0] if self.queues else self.fallback
            return [f"-j NFQUEUE --queue-num {queue}{bypass}"]
        tuple_ = TUPLES[self.spread]
        lines = [
            f"-j HMARK --hmark-tuple {tuple_} --hmark-mod {len(self.queues)} "
            f"--hmark-rnd {HMARK_SEED:#x}"
        ]
        lines += [
            f"-m mark --mark {mark} -j NFQUEUE --queue-num {queue}{bypass}"
            for mark, queue in enumerate(self.queues)
        ]
        return lines


def restore_text(steering: Steering) -> str:
    """The input of `iptables-restore --noflush` that replaces the chain in one transaction."""
    lines = ["*filter", f":{steering.chain} - [0:0]"]
    lines += [f"-A {steering.chain} {rule}" for rule in steering.rules()]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def jump_rule(chain: str, interface: str | None) -> list[str]:
    """The FORWARD rule (as iptables arguments, without -A/-I/-D) that enters the chain."""
    match = ["-i", interface] if interface else []
    return ["FORWARD", *match, "-j", chain]


def _run(
    namespace: str, argv: Sequence[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            netns.exec_argv(namespace, argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SteeringError(f"cannot run {exc.filename}: install iproute2 and iptables") from None
    except subprocess.TimeoutExpired:
        raise SteeringError(
            f"{argv[0]} in namespace {namespace} took over {TIMEOUT:.0f} s"
        ) from None


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise SteeringError(f"{what}: {detail}")


def apply(namespace: str, steering: Steering) -> None:
    """Replace the service's chain in both families (one transaction each)."""
    if not netns.exists(namespace):
        raise SteeringError(f"gateway namespace {namespace!r} does not exist (vmbox lab up?)")
    text = restore_text(steering)
    for tool in FAMILIES:
        done = _run(namespace, [f"{tool}-restore", "--noflush"], stdin=text)
        _check(done, f"{tool}-restore in namespace {namespace}")


def install(namespace: str, steering: Steering, interface: str | None) -> None:
    """Write the chain, then jump to it from FORWARD (once, however often this runs)."""
    apply(namespace, steering)
    jump = jump_rule(steering.chain, interface)
    for tool in FAMILIES:
        if _run(namespace, [tool, "-C", *jump]).returncode != 0:
            _check(_run(namespace, [tool, "-I", *jump]), f"{tool} -I {' '.join(jump)}")


def remove(namespace: str, chain: str, interface: str | None) -> None:
    """Take the service out of the path: the jump, then the chain. Gone already is fine."""
    if not netns.exists(namespace):
        return
    jump = jump_rule(chain, interface)
    for tool in FAMILIES:
        for _ in range(16):  # every copy of the jump, bounded
            if _run(namespace, [tool, "-D", *jump]).returncode != 0:
                break
        _run(namespace, [tool, "-F", chain])
        _run(namespace, [tool, "-X", chain])
    _drop_empty_tables(namespace)


EMPTY_FILTER = ["*filter", ":INPUT ACCEPT", ":FORWARD ACCEPT", ":OUTPUT ACCEPT", "COMMIT"]


def _drop_empty_tables(namespace: str) -> None:
    """iptables-nft made a filter table per family for the chain: if nothing else is in
    it (every base chain empty, policy ACCEPT), delete it, as it would forward the same."""
    for tool, family in zip(FAMILIES, ("ip", "ip6"), strict=True):
        done = _run(namespace, [f"{tool}-save", "-t", "filter"])
        lines = [
            line.split(" [")[0]
            for line in done.stdout.splitlines()
            if line and not line.startswith("#")
        ]
        if done.returncode == 0 and lines == EMPTY_FILTER:
            _run(namespace, ["nft", "delete", "table", family, "filter"])


def current(namespace: str, chain: str) -> list[str]:
    """The chain's rules as iptables -S prints them (IPv4), for status and tests."""
    done = _run(namespace, ["iptables", "-S", chain])
    if done.returncode != 0:
        return []
    return [
        line for line in done.stdout.splitlines() if re.match(rf"-A {re.escape(chain)}\b", line)
    ]
