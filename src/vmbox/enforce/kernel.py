"""The driver of `enforce: kernel`: a service's nftables table in a node's namespace.

`KernelEnforcer(namespace, table)` runs `ip netns exec NS nft -j ...` as an
asyncio subprocess (vmbox.netns.exec_argv), with a bounded timeout and a
one-line error (`EnforceError`), and keeps the generation of each rule's sets:

- `install(rates)` once: the table (replacing one of that name), generation 1;
- `set_rates(rates, sources)` per share change: one transaction
  (vmbox.enforce.nftables): the rules' rates, and under `split: demand` the
  sources with a share of their own (`sources`: rule -> address -> rate), each
  kept in a chain slot of its own while it has one;
- `read()` at the report interval: per rule its named counters, per source what
  it offered since the previous read, from the sets' elements and the source
  chains' counters, all in one `nft -j list table` (a new generation's element
  counters start at 0: what a source offered between the last read and a change
  is not reported);
- `remove()`: the table and everything in it, whether or not it is there.

The documents are vmbox.enforce.nftables's (pure); only this module runs nft.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmbox import netns
from vmbox.enforce import nftables as nft
from vmbox.enforce.nftables import Count, Rate, SourceRate, Table

SourceRates = Mapping[str, Mapping[str, Rate]]  # rule name -> source address -> its rate

TIMEOUT = 10.0  # seconds one nft call may take
NFT = "nft"


class EnforceError(OSError):
    """nft refused, is missing, or took too long; str() is one line."""


async def run_nft(
    namespace: str | None,
    args: Sequence[str],
    document: Mapping[str, Any] | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """`nft -j ARGS` (with `document` on stdin for `-f -`) inside `namespace`; its JSON output.

    namespace None runs nft where this process is: only for a throwaway
    namespace the caller made (`unshare -n`), never the host's.

    nft runs from a thread with subprocess.run, not with the event loop's
    subprocess support: uvloop (the replicas' loop) forks to spawn, and in a
    child forked beside gRPC's threads gRPC's fork handler crashes (SIGSEGV in
    its event_engine thread) before nft starts; subprocess.run spawns with
    vfork, which runs no fork handlers. (uvloop's piped stdin is also a socket,
    which nft cannot open as /dev/stdin.)
    """
    return await asyncio.to_thread(run_nft_blocking, namespace, args, document, timeout)


def run_nft_blocking(
    namespace: str | None,
    args: Sequence[str],
    document: Mapping[str, Any] | None = None,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """`run_nft` in the calling thread (a metrics scrape reads the counters this way)."""
    argv = [NFT, "-j", *args]
    if namespace is not None:
        argv = netns.exec_argv(namespace, argv)
    stdin = json.dumps(document).encode() if document is not None else None
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise EnforceError(
            f"`{argv[0]}` is not installed (apt-get install nftables iproute2)"
        ) from None
    except subprocess.TimeoutExpired:
        raise EnforceError(
            f"nft {' '.join(args)} in {namespace}: no answer in {timeout:g} s"
        ) from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        why = " ".join(err.split()) or f"exit {done.returncode}"
        raise EnforceError(f"nft {' '.join(args)} in {namespace}: {why[:300]}")
    text = done.stdout.decode(errors="replace").strip()
    return json.loads(text) if text else {}


async def apply(namespace: str | None, document: Mapping[str, Any], check: bool = False) -> None:
    """Run one transaction (`nft -j -f -`); `check` only validates it (`-c`)."""
    await run_nft(namespace, ["-c", "-f", "-"] if check else ["-f", "-"], document)


@dataclass
class Reading:
    """One read: per rule its counters; per rule and source what it offered since the last read."""

    rules: dict[str, dict[str, int]]
    offered: dict[str, dict[str, Count]]
    sources: dict[str, int]  # elements in each rule's sets now
    seen: Count = field(default_factory=Count)  # every packet the table saw (at its interface)
    # Dropped by its rules (not shadow ones), while closed, or past its switch's deadline.
    dropped: Count = field(default_factory=Count)


@dataclass
class KernelEnforcer:
    """One service's table in one namespace (a node)."""

    namespace: str
    table: Table
    timeout: float = TIMEOUT
    generation: int = 0
    _last: dict[tuple[str, int], dict[str, Count]] = field(default_factory=dict)
    # split: demand: rule -> chain slot -> the source in it and its rate, as installed.
    slots: dict[str, dict[int, SourceRate]] = field(default_factory=dict)
    _last_slots: dict[tuple[str, int, str], Count] = field(default_factory=dict)

    async def install(
        self,
        rates: Mapping[str, Rate],
        *,
        closed: bool = False,
        sources: SourceRates | None = None,
        deadline: int | None = None,
    ) -> None:
        """The table anew (generation 1), at `rates` and `sources` (split: demand's own
        shares); `closed` drops every packet it sees (and holds no source chains); with
        a `deadline` (Unix seconds), everything once the clock passes it (`renew`)."""
        slots = {} if closed or not sources else _assign({}, sources)
        await self._apply(
            nft.install(self.table, rates, 1, closed=closed, sources=slots, deadline=deadline),
        )
        self.generation, self.slots = 1, slots
        self._last.clear()
        self._last_slots.clear()

    async def set_rates(
        self, rates: Mapping[str, Rate] | None, sources: SourceRates | None = None
    ) -> None:
        """One transaction: with `rates`, every ratelimit rule moves to a new generation at
        them; with `sources`, the sources with a share of their own become these."""
        if self.generation == 0:
            raise EnforceError(f"{self.table.name} in {self.namespace}: set_rates before install")
        cmds: list[Any] = []
        if rates:
            if len({r.name for _, r in self.table.limited()} - set(rates)) > 0:
                raise EnforceError("set_rates needs a rate for every ratelimit rule")
            cmds += nft.set_rates(self.table, rates, self.generation + 1)["nftables"]
        slots = self.slots if sources is None else _assign(self.slots, sources)
        cmds += nft.source_changes(self.table, self.slots, slots)
        if not cmds:
            return
        await self._apply({"nftables": cmds})
        if rates:
            self.generation += 1
        self.slots = slots

    async def renew(self, deadline: int) -> None:
        """Move the dead man's switch to `deadline` (a table installed with one)."""
        await self._apply(nft.renew(self.table, deadline))

    def read_counters_blocking(self) -> Reading:
        """The named counters alone, in the calling thread (one nft call)."""
        listing = run_nft_blocking(
            self.namespace, nft.list_counters(self.table), None, self.timeout
        )
        return self._reading(nft.parse_counters(listing), {}, {})

    async def read(self, *, sources: bool = True) -> Reading:
        """The named counters alone (one `list counters`) or, with `sources`, those and what
        each source offered since the last read (one `list table`: every set's elements,
        and the source chains' counters), for the demand split."""
        if not sources:
            args = nft.list_counters(self.table)
            listing = await run_nft(self.namespace, args, timeout=self.timeout)
            return self._reading(nft.parse_counters(listing), {}, {})
        listing = await run_nft(self.namespace, nft.list_table(self.table), timeout=self.timeout)
        counters, sets = nft.parse_counters(listing), nft.parse_sets(listing)
        offered: dict[str, dict[str, Count]] = {}
        sizes: dict[str, int] = {}
        last_slots: dict[tuple[str, int, str], Count] = {}
        for index, rule in self.table.limited():
            now: dict[str, Count] = {}
            for version in nft.versions(rule):
                now |= sets.get(nft.set_name(index, self.generation, version), {})
            key = (rule.name, self.generation)
            before = self._last.get(key, {})
            mine = {
                source: _minus(c, before.get(source, Count()))
                for source, c in now.items()
                if c.packets > before.get(source, Count()).packets
            }
            for slot, held in self.slots.get(rule.name, {}).items():
                count = counters.get(nft.source_counter(index, slot), Count())
                seen = (rule.name, slot, held.address)
                last_slots[seen] = count
                if count.packets > self._last_slots.get(seen, Count()).packets:
                    extra = _minus(count, self._last_slots.get(seen, Count()))
                    mine[held.address] = _plus(mine.get(held.address, Count()), extra)
            offered[rule.name] = mine
            self._last = {k: v for k, v in self._last.items() if k[0] != rule.name}
            self._last[key] = now
            sizes[rule.name] = len(now)
        self._last_slots = last_slots
        return self._reading(counters, offered, sizes)

    def _reading(
        self,
        counters: Mapping[str, Count],
        offered: dict[str, dict[str, Count]],
        sizes: dict[str, int],
    ) -> Reading:
        dropped = [counters.get(nft.CLOSED, Count()), counters.get(nft.EXPIRED, Count())]
        for index, rule in enumerate(self.table.rules):
            if not rule.shadow:  # a shadow rule's counter holds would-drops
                dropped.append(counters.get(nft.counter_names(index)["dropped"], Count()))
        return Reading(
            nft.rule_counters(self.table, counters),
            offered,
            sizes,
            counters.get(nft.SEEN, Count()),
            Count(sum(c.packets for c in dropped), sum(c.bytes for c in dropped)),
        )

    async def remove(self) -> None:
        await self._apply(nft.delete(self.table))
        self.generation, self.slots = 0, {}
        self._last.clear()
        self._last_slots.clear()

    async def _apply(self, document: Mapping[str, Any]) -> None:
        await run_nft(self.namespace, ["-f", "-"], document, timeout=self.timeout)


def _minus(a: Count, b: Count) -> Count:
    return Count(a.packets - b.packets, a.bytes - b.bytes)


def _plus(a: Count, b: Count) -> Count:
    return Count(a.packets + b.packets, a.bytes + b.bytes)


def _assign(
    slots: Mapping[str, Mapping[int, SourceRate]], sources: SourceRates
) -> dict[str, dict[int, SourceRate]]:
    """Chain slots for `sources`: a source keeps the slot it has, a new one takes the
    smallest free slot of its rule (pure; a slot holds one address while it lives)."""
    result: dict[str, dict[int, SourceRate]] = {}
    for rule, wanted in sources.items():
        held = {s.address: slot for slot, s in slots.get(rule, {}).items()}
        mine = {held[a]: SourceRate(a, r) for a, r in wanted.items() if a in held}
        taken = set(held.values())  # a slot freed now is reused by a later transaction
        free = (n for n in range(len(held) + len(wanted) + 1) if n not in taken)
        for address, rate in sorted(wanted.items()):
            if address not in held:
                slot = next(free)
                taken.add(slot)
                mine[slot] = SourceRate(address, rate)
        result[rule] = mine
    return result
