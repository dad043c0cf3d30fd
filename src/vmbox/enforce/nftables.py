"""Pure: the nftables JSON documents of `enforce: kernel` (docs/nftables-rates.md says why).

One table per service, `inet vmbox_<service>`, in the node's (gateway's)
namespace. Its base chain `filter` sits on the forward hook and holds the
rules of the in-path data plane in order (first match wins): `accept` and
`drop` rules are one nftables rule each; a `ratelimit` rule jumps to a
chain of its own, `r<i>`, which holds the per-source state:

- two dynamic sets per generation, `r<i>g<gen>v4` and `...v6`, keyed by
  source address, `size` elements at most, elements leaving `timeout`
  seconds after a source's last packet; each element carries a `counter`
  (what the source offered: the demand report's unit) and a `limit rate over
  <this node's share>` (a token bucket of `burst`): `update @set { ip saddr
  counter limit rate over R/second burst B packets } counter name "r<i>d"
  drop`;
- a source the full set could not take (a flood of fresh addresses) matches
  none of the sets and is held by one bucket shared by all such sources, at
  one source's rate, as the in-path limiter's overflow bucket is;
- then `accept`: a rule that passed decides.

The rate of a limit is fixed when its element is created: a new share cannot
reach existing elements (nor a named limit object: the kernel ignores an
update of one). So `set_rates` is one transaction that creates the next
generation's sets, flushes the rule's chain and refills it against them, and
deletes the previous generation's sets: atomic for packets, every source
starting the new share with a full bucket (at most `burst` more than the
rate in the second of the change, the finding's bound).

Under `split: demand` each rule's chain first looks the source up in a
verdict map (`r<i>hv4`, `r<i>hv6`) that sends a source with a share of its
own to a chain of its own, `r<i>s<slot>` (its counter `r<i>s<slot>c`, its
limit, accept): `source_changes`. With a deadline, the base chain jumps to
chain `alive`, the dead man's switch, which drops everything (counted in
`expired`) once the wall clock passes it; `renew` moves it.

Counters: the named counters `r<i>m` (matched) and `r<i>d` (dropped,
shadow drops included) per rule and `r<i>o` (overflow drops), read with
`nft -j list counters table ...`; per source, the elements' and the source
chains' counters, read with one `nft -j list table ...` (element counters
restart at 0 with each generation).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vmbox.functions.rules import CATCH_ALL, parse_ports

FAMILY = "inet"
BASE_CHAIN = "filter"
DEFAULT_SIZE = 65535
DEFAULT_TIMEOUT = 10  # seconds a source's element outlives its last packet
MIN_BURST = 1  # nftables replaces a burst of 0 packets by 5: never send 0
ICMP_NUMBERS = (1, 58)  # icmp, ipv6-icmp
PROTOCOLS: dict[str, tuple[int, ...]] = {"tcp": (6,), "udp": (17,), "icmp": ICMP_NUMBERS}
PER_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,40}")
SEEN, CLOSED = "seen", "closed"  # the base chain's counters: every packet; dropped while closed
# The dead man's switch: chain ALIVE drops (counted in EXPIRED) every packet once the
# wall clock passes the deadline its replica last renewed (`renew`).
ALIVE, EXPIRED = "alive", "expired"

Action = Literal["accept", "drop", "ratelimit"]
Unit = Literal["packets", "bytes"]
Doc = dict[str, Any]


class NftablesError(ValueError):
    """A table cannot be built from what was given; str() is one line."""


@dataclass(frozen=True, slots=True)
class Rate:
    """A ratelimit rule's per-source rate at this node: `amount` per `per`, bucket `burst`.

    `amount` 0 closes the rule (everything it matches is dropped: a share of 0).
    """

    amount: int
    per: str = "second"
    burst: int = 5

    def __post_init__(self) -> None:
        if self.amount < 0 or self.burst < 0:
            raise NftablesError(f"a rate and its burst are >= 0, not {self.amount}/{self.burst}")
        if self.per not in PER_SECONDS:
            raise NftablesError(f"per must be one of {', '.join(PER_SECONDS)}, not {self.per!r}")


def rate_for(share: int, window: float, burst: int) -> Rate:
    """`share` per `window` seconds as the nftables rate nearest below it, in whole units.

    nftables counts a rate in whole packets (or bytes) per second, minute, hour,
    day or week: the smallest `per` in which the rate is whole is taken, else
    the largest, rounded down (never more than the share).
    """
    if share <= 0:
        return Rate(0, "second", max(burst, MIN_BURST))
    for per, seconds in PER_SECONDS.items():
        exact = share * seconds / window
        if abs(exact - round(exact)) < 1e-9:
            return Rate(round(exact), per, max(burst, MIN_BURST))
    return Rate(int(share * PER_SECONDS["week"] / window), "week", max(burst, MIN_BURST))


@dataclass(frozen=True, slots=True)
class KernelRule:
    """One rule of the in-path rule set, as the kernel table enforces it."""

    name: str
    action: Action
    proto: str = "any"
    src: str | None = None
    dst: str | None = None
    dport: int | str | None = None
    unit: Unit = "packets"
    shadow: bool = False

    @property
    def version(self) -> int | None:
        """4 or 6 when a CIDR ties the rule to one IP version, else None."""
        versions = {ipaddress.ip_network(c).version for c in (self.src, self.dst) if c}
        if len(versions) > 1:
            return 0  # a v4 and a v6 CIDR: no packet matches
        return versions.pop() if versions else None


def kernel_rules(config: Mapping[str, Any]) -> tuple[KernelRule, ...]:
    """The middlebox config's `rules`, then `limit` as the final catch-all ratelimit rule.

    The same reading as vmbox.functions.rules.RuleSet: a spec with only `limit`
    is that one rule.
    """
    rules = []
    for spec in config.get("rules") or ():
        match = spec.get("match") or {}
        rules.append(
            KernelRule(
                name=spec["name"],
                action=spec["action"],
                proto=str(match.get("proto", "any")),
                src=match.get("src"),
                dst=match.get("dst"),
                dport=match.get("dport"),
                unit=spec.get("unit") or "packets",
                shadow=bool(spec.get("shadow", False)),
            )
        )
    if config.get("limit") is not None:
        rules.append(KernelRule(CATCH_ALL, "ratelimit"))
    return tuple(rules)


@dataclass(frozen=True, slots=True)
class Table:
    """A service's table: its rules, where it applies, and its sets' bounds."""

    service: str
    rules: tuple[KernelRule, ...]
    interface: str | None = None  # only packets entering the node here (the client side)
    size: int = DEFAULT_SIZE
    timeout: int = DEFAULT_TIMEOUT
    priority: int = 0
    # split: demand: each rule's chain first looks the source up in a verdict map that
    # sends a source with a share of its own to a chain of its own (`source_changes`).
    demand: bool = False
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.service.replace("-", "_")):
            raise NftablesError(
                f"a service name for a table is 1-40 of [A-Za-z0-9_-], not {self.service!r}"
            )
        if not 1 <= self.size <= 1 << 24 or self.timeout < 1:
            raise NftablesError("a set's size is 1..16777216 and its timeout >= 1 s")
        seen = [r.name for r in self.rules]
        if len(set(seen)) != len(seen):
            raise NftablesError("rule names must be unique")
        object.__setattr__(self, "names", tuple(seen))

    @property
    def name(self) -> str:
        return "vmbox_" + self.service.replace("-", "_")

    def limited(self) -> list[tuple[int, KernelRule]]:
        """The ratelimit rules with their index (their chain is `r<index>`)."""
        return [(i, r) for i, r in enumerate(self.rules) if r.action == "ratelimit"]

    def _ref(self) -> Doc:
        return {"family": FAMILY, "table": self.name}


def chain_name(index: int) -> str:
    return f"r{index}"


def set_name(index: int, generation: int, version: int) -> str:
    return f"r{index}g{generation}v{version}"


def map_name(index: int, version: int) -> str:
    """The verdict map from a source with a share of its own to its chain."""
    return f"r{index}hv{version}"


def source_chain(index: int, slot: int) -> str:
    return f"r{index}s{slot}"


def source_counter(index: int, slot: int) -> str:
    """What the source of a source chain offered (it counts before the limit)."""
    return f"r{index}s{slot}c"


def counter_names(index: int) -> dict[str, str]:
    """A rule's named counters: matched, dropped (shadow drops too), overflow drops."""
    return {"matched": f"r{index}m", "dropped": f"r{index}d", "overflow": f"r{index}o"}


def _match(left: Doc, right: Any, op: str = "==") -> Doc:
    return {"match": {"op": op, "left": left, "right": right}}


def _saddr(version: int) -> Doc:
    return {"payload": {"protocol": "ip" if version == 4 else "ip6", "field": "saddr"}}


def _cidr(cidr: str, side: str) -> Doc:
    net = ipaddress.ip_network(cidr)
    proto = "ip" if net.version == 4 else "ip6"
    right: Any = (
        str(net.network_address)
        if net.prefixlen == net.max_prefixlen
        else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    )
    return _match({"payload": {"protocol": proto, "field": side}}, right)


def _matches(rule: KernelRule, interface: str | None) -> list[Doc]:
    """The rule's `match` as nftables expressions (empty: every packet)."""
    exprs: list[Doc] = []
    if interface:
        exprs.append(_match({"meta": {"key": "iifname"}}, interface))
    if rule.proto != "any":
        numbers = PROTOCOLS[rule.proto]
        right: Any = numbers[0] if len(numbers) == 1 else {"set": list(numbers)}
        exprs.append(_match({"meta": {"key": "l4proto"}}, right))
    if rule.src:
        exprs.append(_cidr(rule.src, "saddr"))
    if rule.dst:
        exprs.append(_cidr(rule.dst, "daddr"))
    if rule.dport is not None:
        low, high = parse_ports(rule.dport)
        if rule.proto not in ("tcp", "udp"):  # dport is tcp's and udp's only
            exprs.append(_match({"meta": {"key": "l4proto"}}, {"set": [6, 17]}))
        port: Any = low if low == high else {"range": [low, high]}
        exprs.append(_match({"payload": {"protocol": "th", "field": "dport"}}, port))
    return exprs


def _limit(rule: KernelRule, rate: Rate) -> Doc:
    limit: Doc = {"rate": rate.amount, "per": rate.per, "burst": max(rate.burst, MIN_BURST)}
    if rule.unit == "bytes":
        limit |= {"rate_unit": "bytes", "burst_unit": "bytes"}
    return {"limit": {**limit, "inv": True}}


def versions(rule: KernelRule) -> tuple[int, ...]:
    version = rule.version
    return (4, 6) if version is None else ((version,) if version else ())


def _add(kind: str, body: Doc) -> Doc:
    return {"add": {kind: body}}


def _rule(table: Table, chain: str, exprs: list[Doc]) -> Doc:
    return _add("rule", {**table._ref(), "chain": chain, "expr": exprs})


def _sets(table: Table, index: int, rule: KernelRule, generation: int) -> list[Doc]:
    return [
        _add(
            "set",
            {
                **table._ref(),
                "name": set_name(index, generation, v),
                "type": "ipv4_addr" if v == 4 else "ipv6_addr",
                "flags": [
                    "timeout"
                ],  # nft 1.0.6 JSON knows no "dynamic"; it adds it for `update @set`
                "timeout": table.timeout,
                "size": table.size,
            },
        )
        for v in versions(rule)
    ]


def _limiter_rules(
    table: Table, index: int, rule: KernelRule, rate: Rate, generation: int
) -> list[Doc]:
    """The body of chain `r<index>`: per-source buckets, the overflow bucket, the verdict."""
    chain, counters = chain_name(index), counter_names(index)
    verdict: list[Doc] = [{"counter": counters["dropped"]}]
    if not rule.shadow:
        verdict.append({"drop": None})
    if rate.amount == 0:  # a share of 0: everything this rule matches is over
        body = [_rule(table, chain, verdict)]
    else:
        body = []
        for v in versions(rule) if table.demand else ():  # a source with its own share
            lookup = {"vmap": {"key": _saddr(v), "data": "@" + map_name(index, v)}}
            body.append(_rule(table, chain, [lookup]))
        for v in versions(rule):
            name = set_name(index, generation, v)
            update = {
                "set": {
                    "op": "update",
                    "elem": _saddr(v),
                    "set": "@" + name,
                    "stmt": [{"counter": None}, _limit(rule, rate)],
                }
            }
            body.append(_rule(table, chain, [update, *verdict]))
        for v in versions(rule):  # not in the (full) set: the shared overflow bucket
            name = set_name(index, generation, v)
            overflow = [
                _match(_saddr(v), "@" + name, "!="),
                _limit(rule, rate),
                {"counter": counters["overflow"]},
                *verdict,
            ]
            body.append(_rule(table, chain, overflow))
    if not rule.shadow:
        body.append(_rule(table, chain, [{"accept": None}]))
    return body


def _base_rule(table: Table, index: int, rule: KernelRule) -> Doc:
    counters = counter_names(index)
    exprs = [*_matches(rule, table.interface), {"counter": counters["matched"]}]
    if rule.action == "ratelimit":
        exprs.append({"jump": {"target": chain_name(index)}})
    elif rule.shadow:
        if rule.action == "drop":
            exprs.append({"counter": counters["dropped"]})
    else:
        if rule.action == "drop":
            exprs.append({"counter": counters["dropped"]})
        exprs.append({rule.action: None})
    return _rule(table, BASE_CHAIN, exprs)


def _rates_for(table: Table, rates: Mapping[str, Rate]) -> dict[int, Rate]:
    missing = [r.name for _, r in table.limited() if r.name not in rates]
    if missing:
        raise NftablesError(f"no rate for ratelimit rule(s) {', '.join(missing)}")
    return {i: rates[r.name] for i, r in table.limited()}


def install(
    table: Table,
    rates: Mapping[str, Rate],
    generation: int = 1,
    *,
    closed: bool = False,
    sources: Mapping[str, Mapping[int, SourceRate]] | None = None,
    deadline: int | None = None,
) -> Doc:
    """The transaction that creates the table (replacing one of that name) with its rates.

    Its base chain counts every packet it sees first (`seen`); with a `deadline`
    (Unix seconds) it then jumps to the dead man's switch (chain `alive`: every
    packet dropped once the clock is past it, until `renew` moves it on);
    `closed` (a fail policy's answer while the store is away) then drops them
    all (`closed`) before any rule, as the Python data plane's fail verdict does.
    """
    by_index = _rates_for(table, rates)
    ref = table._ref()
    cmds: list[Doc] = [
        _add("table", {"family": FAMILY, "name": table.name}),
        {"delete": {"table": {"family": FAMILY, "name": table.name}}},
        _add("table", {"family": FAMILY, "name": table.name}),
    ]
    for name in (SEEN, CLOSED, EXPIRED):
        cmds.append(_add("counter", {**ref, "name": name}))
    if deadline is not None:
        cmds.append(_add("chain", {**ref, "name": ALIVE}))
        cmds.append(_alive_rule(table, deadline))
    for index, _ in enumerate(table.rules):
        for name in counter_names(index).values():
            cmds.append(_add("counter", {**ref, "name": name}))
    for index, rule in table.limited():
        cmds.append(_add("chain", {**ref, "name": chain_name(index)}))
        cmds.extend(_sets(table, index, rule, generation))
        for v in versions(rule) if table.demand else ():
            kind = "ipv4_addr" if v == 4 else "ipv6_addr"
            cmds.append(
                _add("map", {**ref, "name": map_name(index, v), "type": kind, "map": "verdict"})
            )
    cmds.append(
        _add(
            "chain",
            {
                **ref,
                "name": BASE_CHAIN,
                "type": "filter",
                "hook": "forward",
                "prio": table.priority,
                "policy": "accept",
            },
        )
    )
    for index, rule in table.limited():
        cmds.extend(_limiter_rules(table, index, rule, by_index[index], generation))
    arriving = _matches(KernelRule("", "accept"), table.interface)
    cmds.append(_rule(table, BASE_CHAIN, [*arriving, {"counter": SEEN}]))
    if deadline is not None:
        cmds.append(_rule(table, BASE_CHAIN, [*arriving, {"jump": {"target": ALIVE}}]))
    if closed:
        cmds.append(_rule(table, BASE_CHAIN, [*arriving, {"counter": CLOSED}, {"drop": None}]))
    for index, rule in enumerate(table.rules):
        if rule.version != 0:  # a v4 and a v6 CIDR: no packet matches, nft refuses the rule
            cmds.append(_base_rule(table, index, rule))
    if sources:
        cmds.extend(source_changes(table, {}, sources))
    return {"nftables": cmds}


def set_rates(table: Table, rates: Mapping[str, Rate], generation: int) -> Doc:
    """One transaction: generation `generation`'s sets at the new rates replace the previous ones.

    Only the rules named in `rates` change; each one's chain is flushed and
    refilled against its new sets, and its previous sets are deleted, all
    atomically for packets.
    """
    ref = table._ref()
    cmds: list[Doc] = []
    for index, rule in table.limited():
        if rule.name not in rates:
            continue
        cmds.extend(_sets(table, index, rule, generation))
        cmds.append({"flush": {"chain": {**ref, "name": chain_name(index)}}})
        cmds.extend(_limiter_rules(table, index, rule, rates[rule.name], generation))
        for v in versions(rule):
            cmds.append({"delete": {"set": {**ref, "name": set_name(index, generation - 1, v)}}})
    return {"nftables": cmds}


@dataclass(frozen=True, slots=True)
class SourceRate:
    """A source with a share of its own (split: demand), in chain `r<i>s<slot>`."""

    address: str
    rate: Rate

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


def _source_body(table: Table, index: int, rule: KernelRule, slot: int, rate: Rate) -> list[Doc]:
    """A source chain: count what the source offers, drop what is over its own rate, accept.

    Entered with `goto` from the verdict map, so a shadow rule's chain, which ends
    without a verdict, returns to the base chain, as the rule's own chain does."""
    chain, counters = source_chain(index, slot), counter_names(index)
    verdict: list[Doc] = [{"counter": counters["dropped"]}]
    if not rule.shadow:
        verdict.append({"drop": None})
    offered: Doc = {"counter": source_counter(index, slot)}
    if rate.amount == 0:
        return [_rule(table, chain, [offered, *verdict])]
    body = [_rule(table, chain, [offered, _limit(rule, rate), *verdict])]
    if not rule.shadow:
        body.append(_rule(table, chain, [{"accept": None}]))
    return body


def _element(table: Table, index: int, source: SourceRate, slot: int | None) -> Doc:
    """The map element of `source` (with its chain; slot None: the key alone, to delete)."""
    key: Any = source.address
    elem = key if slot is None else [key, {"goto": {"target": source_chain(index, slot)}}]
    return {"element": {**table._ref(), "name": map_name(index, source.version), "elem": [elem]}}


def source_changes(
    table: Table,
    before: Mapping[str, Mapping[int, SourceRate]],
    after: Mapping[str, Mapping[int, SourceRate]],
) -> list[Doc]:
    """The commands that take each rule's sources with a share of their own (by rule name,
    then chain slot) from `before` to `after`, for one transaction: a new slot gets its
    counter, chain and map element; a changed rate refills its chain (the source starts
    the new rate with a full bucket, as a generation swap does); a slot gone loses its
    element, then its chain and counter. A slot holds one address while it lives."""
    ref = table._ref()
    cmds: list[Doc] = []
    for index, rule in table.limited():
        old, new = before.get(rule.name, {}), after.get(rule.name, {})
        for slot, source in new.items():
            if source.version not in versions(rule):
                raise NftablesError(f"rule {rule.name} matches no IPv{source.version} source")
            previous = old.get(slot)
            if previous is not None and previous.address != source.address:
                raise NftablesError(f"slot {slot} of rule {rule.name} holds another address")
            chain = {**ref, "name": source_chain(index, slot)}
            if previous is None:
                cmds.append(_add("counter", {**ref, "name": source_counter(index, slot)}))
                cmds.append(_add("chain", chain))
            elif previous.rate == source.rate:
                continue
            else:
                cmds.append({"flush": {"chain": chain}})
            cmds.extend(_source_body(table, index, rule, slot, source.rate))
            if previous is None:
                cmds.append({"add": _element(table, index, source, slot)})
        for slot, source in old.items():
            if slot in new:
                continue
            chain = {**ref, "name": source_chain(index, slot)}
            cmds.append({"delete": _element(table, index, source, None)})
            cmds.append({"flush": {"chain": chain}})
            cmds.append({"delete": {"chain": chain}})
            cmds.append({"delete": {"counter": {**ref, "name": source_counter(index, slot)}}})
    return cmds


def _alive_rule(table: Table, deadline: int) -> Doc:
    """Drop (and count) every packet once the wall clock is past `deadline` (Unix seconds)."""
    late = _match({"meta": {"key": "time"}}, deadline, ">")
    return _rule(table, ALIVE, [late, {"counter": EXPIRED}, {"drop": None}])


def renew(table: Table, deadline: int) -> Doc:
    """The dead man's switch moved to `deadline` (Unix seconds): one small transaction that
    touches nothing else, so the controller can renew a dead replica's table it holds
    without knowing its state (closed or not, its rates, its generation)."""
    return {
        "nftables": [
            {"flush": {"chain": {**table._ref(), "name": ALIVE}}},
            _alive_rule(table, deadline),
        ]
    }


def delete(table: Table) -> Doc:
    """The transaction that removes the table, whether or not it exists (add, then delete)."""
    name = {"family": FAMILY, "name": table.name}
    return {"nftables": [_add("table", dict(name)), {"delete": {"table": dict(name)}}]}


def list_set(table: Table, index: int, generation: int, version: int) -> list[str]:
    """The argv (after `nft -j`) that lists one of a rule's sets."""
    return ["list", "set", FAMILY, table.name, set_name(index, generation, version)]


def list_counters(table: Table) -> list[str]:
    return ["list", "counters", "table", FAMILY, table.name]


def list_table(table: Table) -> list[str]:
    """Everything in one call: counters, and every set with its elements."""
    return ["list", "table", FAMILY, table.name]


@dataclass(frozen=True, slots=True)
class Count:
    packets: int = 0
    bytes: int = 0


def _items(listing: Mapping[str, Any], kind: str) -> Iterable[Mapping[str, Any]]:
    for item in listing.get("nftables") or ():
        if isinstance(item, Mapping) and kind in item:
            yield item[kind]


def parse_set(listing: Mapping[str, Any]) -> dict[str, Count]:
    """`nft -j list set` output: each element's source address and its counter."""
    counts: dict[str, Count] = {}
    for body in _items(listing, "set"):
        for elem in body.get("elem") or ():
            if not isinstance(elem, Mapping) or "elem" not in elem:
                continue  # an element without expressions: a bare value, no counter
            inner = elem["elem"]
            counter = inner.get("counter") or {}
            counts[str(inner["val"])] = Count(
                int(counter.get("packets", 0)), int(counter.get("bytes", 0))
            )
    return counts


def parse_sets(listing: Mapping[str, Any]) -> dict[str, dict[str, Count]]:
    """`nft -j list table` output: each set's elements and their counters, by set name."""
    return {
        str(body.get("name")): parse_set({"nftables": [{"set": body}]})
        for body in _items(listing, "set")
    }


def parse_counters(listing: Mapping[str, Any]) -> dict[str, Count]:
    """`nft -j list counters` output: each named counter's packets and bytes."""
    return {
        str(body["name"]): Count(int(body.get("packets", 0)), int(body.get("bytes", 0)))
        for body in _items(listing, "counter")
    }


def rule_counters(table: Table, counters: Mapping[str, Count]) -> dict[str, dict[str, int]]:
    """Per rule: matched, passed, dropped, shadow_dropped, overflow (vmbox's rule counters)."""
    result = {}
    for index, rule in enumerate(table.rules):
        names = counter_names(index)
        matched = counters.get(names["matched"], Count()).packets
        dropped = counters.get(names["dropped"], Count()).packets
        result[rule.name] = {
            "matched": matched,
            "passed": matched - dropped,
            "dropped": 0 if rule.shadow else dropped,
            "shadow_dropped": dropped if rule.shadow else 0,
            "overflow": counters.get(names["overflow"], Count()).packets,
        }
    return result
