"""`middlebox.rules`: an ordered rule set, a firewall rather than one counter (pure).

vmbox.functions.ratelimit builds a `RuleSet` when the spec has `rules` (and
the plain limiter of the chosen algorithm when it has only `limit`, so that
spec costs and behaves as before). Rules are tried in order and the first
whose match holds decides: `accept` passes, `drop` drops, `ratelimit` asks
the rule's own limiter (vmbox.functions.fixedwindow or tokenbucket, built by
the factory the caller passes in), which has its own per-source table, its
own share of its limit under the split and the resize guard, and counts
packets or bytes (`unit`). A `shadow` rule decides as usual but only counts
what it would drop, and matching goes on past it, so adding one never
changes what passes. A packet no rule matches is accepted; `middlebox.limit`
beside `rules` is a final ratelimit rule matching everything (rule `limit`,
state item `limit`), as it is the whole rule set without `rules`.

Each ratelimit rule's limit is a shared state item `rules.<name>.limit`
(etcd key /vmbox/<service>/state/rules.<name>.limit): `state_items(config)`
names them for the controller to seed and the replica to watch, and
`update(values=...)` hands a new value to that rule's limiter alone.

Matching is cheap: each rule is compiled to a bit, a port range and the
protocols it applies to (a tuple of candidate rules per protocol number);
addresses are parsed once per distinct address into a mask of the rules
whose CIDRs hold it, in caches bounded at `ADDRESS_CACHE` entries (cleared
when full, so a flood of fresh sources costs a parse each, not memory).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from vmbox.functions.limiter import RateLimiter
from vmbox.group import Group
from vmbox.middlebox import Middlebox, StateItem, encode_int, parse_limit
from vmbox.packet import ICMP, ICMPV6, TCP, UDP, Packet, Verdict

ADDRESS_CACHE = 65536  # distinct addresses whose rule mask is kept
CATCH_ALL = "limit"  # the rule `middlebox.limit` makes, and its state item
UNMATCHED = "(unmatched)"  # what rule_counters() calls the packets no rule matched
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "tcp": (TCP,),
    "udp": (UDP,),
    "icmp": (ICMP, ICMPV6),
}
ACCEPT, DROP, RATELIMIT = 0, 1, 2
ACTIONS = {"accept": ACCEPT, "drop": DROP, "ratelimit": RATELIMIT}
NO_PORT = (0, 1 << 31)  # a rule without dport: every packet's dport is in it

LimiterFactory = Callable[[Mapping[str, Any], Group], RateLimiter]
Network = tuple[int, int, int]  # IP version, first and last address as integers


def limit_item(name: str) -> str:
    """The state item (and etcd key's last segment) holding a rule's limit."""
    return CATCH_ALL if name == CATCH_ALL else f"rules.{name}.limit"


def state_items(config: Mapping[str, Any]) -> tuple[StateItem, ...]:
    """One shared limit per ratelimit rule, then `limit` when the config has one."""
    items = []
    for index, rule in enumerate(config.get("rules") or ()):
        if rule["action"] == "ratelimit":
            items.append(_limit_state(limit_item(rule["name"]), f"rules.{index}.limit"))
    if config.get("limit") is not None:
        items.append(_limit_state(CATCH_ALL, "limit"))
    return tuple(items)


def _limit_state(name: str, config_key: str) -> StateItem:
    return StateItem(name, config_key, parse=parse_limit, encode=encode_int, closed=0)


def parse_ports(dport: int | str | None) -> tuple[int, int]:
    """A rule's dport (80, "8000-8099" or none) as an inclusive range."""
    if dport is None:
        return NO_PORT
    if isinstance(dport, int):
        return dport, dport
    low, _, high = dport.partition("-")
    return int(low), int(high or low)


def network_of(cidr: str | None) -> Network | None:
    if cidr is None:
        return None
    net = ipaddress.ip_network(cidr)
    return net.version, int(net.network_address), int(net.broadcast_address)


def address_of(text: str) -> tuple[int, int] | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None  # no address (the relay's dst) or garbage: only rules without a CIDR match
    return address.version, int(address)


class Rule:
    """One compiled rule and its counters (plain ints: an increment per packet)."""

    __slots__ = (
        "action",
        "bit",
        "by_bytes",
        "dropped",
        "dst",
        "high",
        "limiter",
        "low",
        "matched",
        "name",
        "shadow",
        "shadow_dropped",
        "src",
    )

    def __init__(self, bit: int, spec: Mapping[str, Any], limiter: RateLimiter | None) -> None:
        match = spec.get("match") or {}
        self.name: str = spec["name"]
        self.bit = bit
        self.low, self.high = parse_ports(match.get("dport"))
        self.action = ACTIONS[spec["action"]]
        self.shadow = bool(spec.get("shadow", False))
        self.by_bytes = spec.get("unit") == "bytes"
        self.limiter = limiter
        self.src = network_of(match.get("src"))
        self.dst = network_of(match.get("dst"))
        self.matched = 0
        self.dropped = 0
        self.shadow_dropped = 0

    def counters(self) -> dict[str, int]:
        decided = self.dropped + self.shadow_dropped
        return {
            "matched": self.matched,
            "passed": self.matched - decided,
            "dropped": self.dropped,
            "shadow_dropped": self.shadow_dropped,
        }


def covers(network: Network | None, address: tuple[int, int] | None) -> bool:
    if network is None:
        return True
    return (
        address is not None and network[0] == address[0] and network[1] <= address[1] <= network[2]
    )


class AddressMasks:
    """Address text -> the bits of the rules whose CIDR (on one side) holds it; bounded."""

    def __init__(self, networks: list[tuple[int, Network | None]]) -> None:
        self.networks = networks
        self.cache: dict[str, int] = {}

    def miss(self, text: str) -> int:
        address = address_of(text)
        mask = 0
        for bit, network in self.networks:
            if covers(network, address):
                mask |= bit
        if len(self.cache) >= ADDRESS_CACHE:
            self.cache.clear()
        self.cache[text] = mask
        return mask


class RuleSet(Middlebox):
    """First match wins over `rules` (then `limit`, if given); no match accepts."""

    def __init__(
        self, config: Mapping[str, Any], group: Group, limiter_for: LimiterFactory
    ) -> None:
        super().__init__(config, group, state_items(config))
        specs = list(config.get("rules") or ())
        if config.get("limit") is not None:
            specs.append({"name": CATCH_ALL, "action": "ratelimit", "limit": config["limit"]})
        self.rules: list[Rule] = []
        self.limiters: dict[str, RateLimiter] = {}  # state item -> that rule's limiter
        for index, spec in enumerate(specs):
            limiter = None
            if spec["action"] == "ratelimit":
                # Middlebox-wide settings, the rule's limit; a burst is the catch-all's alone.
                own = {**config, "limit": spec["limit"], "rules": None}
                if spec["name"] != CATCH_ALL:
                    own["burst"] = None
                limiter = self.limiters[limit_item(spec["name"])] = limiter_for(own, group)
            self.rules.append(Rule(1 << index, spec, limiter))
        self.unmatched = 0
        self.src_masks = AddressMasks([(r.bit, r.src) for r in self.rules])
        self.dst_masks = AddressMasks([(r.bit, r.dst) for r in self.rules])
        self.all_bits = (1 << len(self.rules)) - 1
        self.any_src = all(r.src is None for r in self.rules)
        self.any_dst = all(r.dst is None for r in self.rules)
        self.by_proto: dict[int, tuple[Rule, ...]] = {}
        for name, numbers in PROTOCOLS.items():
            for number in numbers:
                self.by_proto[number] = tuple(
                    r for r, s in zip(self.rules, specs, strict=True) if _proto(s) in (name, "any")
                )
        self.other = tuple(r for r, s in zip(self.rules, specs, strict=True) if _proto(s) == "any")

    def start(self, now: float) -> None:
        for limiter in self.limiters.values():
            limiter.start(now)

    def idle(self, now: float) -> None:
        for limiter in self.limiters.values():
            limiter.idle(now)

    def update(self, values: Mapping[str, Any] | None = None, group: Group | None = None) -> None:
        """A rule's new limit reaches that rule's limiter alone; a group reaches them all."""
        if values:
            self.values.update(values)
        if group is not None:
            self.group = group
        for name, limiter in self.limiters.items():
            if group is not None:
                limiter.update(values={"limit": self.values[name]}, group=group)
            elif values and name in values:
                limiter.update(values={"limit": values[name]})

    def process(self, packet: Packet, now: float) -> Verdict:
        mask = self.all_bits
        if not self.any_src:
            masks = self.src_masks
            smask = masks.cache.get(packet.src)
            mask = smask if smask is not None else masks.miss(packet.src)
        if not self.any_dst:
            masks = self.dst_masks
            dmask = masks.cache.get(packet.dst)
            mask &= dmask if dmask is not None else masks.miss(packet.dst)
        dport = packet.dport
        for rule in self.by_proto.get(packet.proto, self.other):
            if not (mask & rule.bit and rule.low <= dport <= rule.high):
                continue
            rule.matched += 1
            action = rule.action
            if action == RATELIMIT:
                limiter = rule.limiter
                assert limiter is not None
                cost = packet.size if rule.by_bytes else packet.segments
                if limiter.process(packet, now, cost) is Verdict.PASS:
                    if rule.shadow:
                        continue
                    return Verdict.PASS
            elif action == ACCEPT:
                return Verdict.PASS
            if rule.shadow:
                rule.shadow_dropped += 1  # would have dropped: the next rules decide
                continue
            rule.dropped += 1
            return Verdict.DROP
        self.unmatched += 1
        return Verdict.PASS

    def rule_counters(self) -> dict[str, dict[str, int]]:
        counters = {rule.name: rule.counters() for rule in self.rules}
        unmatched = self.unmatched
        counters[UNMATCHED] = {
            "matched": unmatched,
            "passed": unmatched,
            "dropped": 0,
            "shadow_dropped": 0,
        }
        return counters

    def gauges(self) -> dict[str, float]:
        """The catch-all limiter's gauges as before, with tables summed over the rules."""
        values: dict[str, float] = {"rules": float(len(self.rules))}
        catch_all = self.limiters.get(CATCH_ALL)
        if catch_all is not None:
            values |= catch_all.gauges()
        for key in ("sources", "overflowed_sources"):
            total = sum(limiter.gauges().get(key, 0.0) for limiter in self.limiters.values())
            values[key] = total
        return values

    def take_demand(self) -> dict[str, int]:
        """Every ratelimit rule's offered counts, keyed `<state item>|<source>`."""
        offered: dict[str, int] = {}
        for name, limiter in self.limiters.items():
            for source, count in limiter.take_demand().items():
                offered[f"{name}|{source}"] = count
        return offered

    def set_demand(self, reports: Mapping[str, Mapping[str, int]], tick: int | None = None) -> None:
        """Hand each rule's limiter its part of every replica's report."""
        split: dict[str, dict[str, dict[str, int]]] = {name: {} for name in self.limiters}
        for replica, report in reports.items():
            for parts in split.values():
                parts[replica] = {}
            for key, count in report.items():
                name, _, source = key.partition("|")
                part = split.get(name)
                if part is not None:
                    part[replica][source] = count
        for name, limiter in self.limiters.items():
            limiter.set_demand(split[name], tick)


def _proto(spec: Mapping[str, Any]) -> str:
    return str((spec.get("match") or {}).get("proto", "any"))
