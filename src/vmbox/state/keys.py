"""The etcd key layout of DESIGN.md, in one place.

Every module that names a key calls these functions, so the layout operators
read with etcdctl is the layout the code writes.
"""

from __future__ import annotations

ROOT = "/vmbox/"


def service_prefix(service: str) -> str:
    return f"{ROOT}{service}/"


def spec_key(service: str) -> str:
    return f"{ROOT}{service}/spec"


def desired_key(service: str) -> str:
    return f"{ROOT}{service}/desired"


def state_key(service: str, item: str) -> str:
    return f"{ROOT}{service}/state/{item}"


def members_prefix(service: str) -> str:
    return f"{ROOT}{service}/members/"


def member_key(service: str, replica: str) -> str:
    return f"{ROOT}{service}/members/{replica}"


def standby_prefix(service: str) -> str:
    return f"{ROOT}{service}/standby/"


def standby_key(service: str, replica: str) -> str:
    # A warm spare (replicas.warm), on its own lease: JSON with its pid and metrics
    # address. Not a member: no share, no ack, no traffic (vmbox.state.standby).
    return f"{ROOT}{service}/standby/{replica}"


def promote_prefix(service: str) -> str:
    return f"{ROOT}{service}/promote/"


def promote_key(service: str, replica: str) -> str:
    # The controller's order to a spare to join the group (JSON: when it was decided);
    # the spare deletes it once it is a member.
    return f"{ROOT}{service}/promote/{replica}"


def acks_prefix(service: str) -> str:
    return f"{ROOT}{service}/acks/"


def ack_key(service: str, replica: str) -> str:
    # The member set this replica last applied (the resize guard, vmbox.state.epoch),
    # on its membership lease.
    return f"{ROOT}{service}/acks/{replica}"


def fence_prefix(service: str, item: str) -> str:
    return f"{ROOT}{service}/fence/{item}/"


def fence_key(service: str, item: str, replica: str) -> str:
    # The newest revision of a `fenced` item this replica applied (ASCII digits), on its
    # membership lease: what `vmbox set` waits for (vmbox.state.fence).
    return f"{ROOT}{service}/fence/{item}/{replica}"


def demand_prefix(service: str) -> str:
    return f"{ROOT}{service}/demand/"


def demand_key(service: str, replica: str) -> str:
    # This replica's latest demand report (JSON source -> packets), on its member lease.
    return f"{ROOT}{service}/demand/{replica}"


def summary_prefix(service: str) -> str:
    # The aggregator's keys (vmbox.state.aggregator), all on the aggregator's member
    # lease: `leader` (who it is), `demand` (the group's heaviest demand, one key),
    # `acks` (the member sets every member has acked). Each replica watches this prefix
    # instead of every other replica's report and ack.
    return f"{ROOT}{service}/summary/"


def summary_key(service: str, name: str) -> str:
    return f"{ROOT}{service}/summary/{name}"


def keyed_prefix(service: str, table: str) -> str:
    # A middlebox's keyed table (vmbox.keyed): one key per entry, each on a lease that
    # ends it by itself (vmbox.state.leaseslots); the firewall's is `conns`.
    return f"{ROOT}{service}/keyed/{table}/"


def samples_key(service: str) -> str:
    # The monitor's latest sample of every replica, one JSON object, for `vmbox status`.
    return f"{ROOT}{service}/samples"


def controller_key(service: str) -> str:
    # The running controller's pid and metrics address.
    return f"{ROOT}{service}/controller"


def events_prefix(service: str) -> str:
    return f"{ROOT}{service}/events/"


def event_key(service: str, seq: int) -> str:
    # Zero-padded so etcd's lexical order is the order events happened in.
    return f"{ROOT}{service}/events/{seq:012d}"


# -- hosts: the `vmbox up` processes and the services each runs ------------------
# Under /vmbox/_hosts/, which no service name can be (a DNS label starts with a
# letter or digit). A host's `alive` key is on its own lease; the rest is not,
# so an etcd outage longer than that lease does not take a host's services away.


def hosts_prefix() -> str:
    return f"{ROOT}_hosts/"


def host_alive_key(host: str) -> str:
    # JSON: pid, hostname, when it started; on the host's lease (gone when it is).
    return f"{ROOT}_hosts/{host}/alive"


def host_services_prefix(host: str) -> str:
    return f"{ROOT}_hosts/{host}/services/"


def host_service_key(host: str, service: str) -> str:
    # Present while `host` is to run `service`: `vmbox up` writes its own specs'
    # keys, `vmbox apply` a new service's, `vmbox delete` removes one.
    return f"{ROOT}_hosts/{host}/services/{service}"


def host_failed_key(host: str, service: str) -> str:
    # Why `host` could not run a service `vmbox apply` gave it (one line, on its lease).
    return f"{ROOT}_hosts/{host}/failed/{service}"


def last_segment(key: str) -> str:
    """'/vmbox/web/members/r1' -> 'r1'."""
    return key.rsplit("/", 1)[-1]
