"""The stateful firewall's packet path (pure): who may open, replies, the table's bounds,
and what a replica that never saw a connection open does with its next packet."""

from __future__ import annotations

from typing import Any

from vmbox.functions.conntrack import ESTABLISHED, Conn, conn_key, parse_conn
from vmbox.functions.firewall import Firewall
from vmbox.group import Group
from vmbox.keyed import Wait
from vmbox.packet import ACK, FIN, ICMP, RST, SYN, TCP, UDP, Packet, Verdict

PASS, DROP = Verdict.PASS, Verdict.DROP
CLIENT, SERVER = "198.18.0.10", "198.19.0.2"
CONFIG: dict[str, Any] = {
    "allow": [
        {"proto": "tcp", "src": "198.18.0.0/24", "dst": "198.19.0.0/24", "dport": 80},
        {"proto": "udp", "dport": 53},
        {"proto": "icmp", "src": "198.18.0.0/24"},
    ],
}


def firewall(**config: Any) -> Firewall:
    return Firewall(CONFIG | config, Group(("r1",), "r1"))


def tcp(src: str, sport: int, dst: str, dport: int, flags: int) -> Packet:
    return Packet(src, sport, 60, TCP, dst, dport, 1, flags)


def out(flags: int, sport: int = 40000) -> Packet:
    return tcp(CLIENT, sport, SERVER, 80, flags)


def back(flags: int, sport: int = 40000) -> Packet:
    return tcp(SERVER, 80, CLIENT, sport, flags)


def handshake(fw: Firewall, now: float = 100.0, sport: int = 40000) -> list[Verdict | Wait]:
    return [
        fw.process(out(SYN, sport), now),
        fw.process(back(SYN | ACK, sport), now),
        fw.process(out(ACK, sport), now),
    ]


def commit_all(fw: Firewall) -> None:
    fw.conns.written(fw.conns.take_writes(), ok=True)


def test_a_handshake_from_the_allowed_side_waits_once_for_its_commit_then_passes() -> None:
    fw = firewall()
    first, second, third = handshake(fw)
    assert (first, second) == (PASS, PASS)
    key, _ = conn_key(out(ACK))
    assert third == Wait("conns", key, commit=True)
    # Another packet of it waits for the same commit; once written, both pass.
    assert fw.process(back(ACK), 100.0) == Wait("conns", key, commit=True)
    writes = fw.conns.take_writes()
    assert [w.key for w in writes] == [key] and parse_conn(writes[0].value or b"").state == "E"
    assert fw.conns.written(writes, ok=True) == [key]
    assert fw.process(out(ACK), 100.0) is PASS
    assert fw.process(back(ACK | 0x08), 100.0) is PASS


def test_nothing_may_open_from_the_server_side_or_to_another_port() -> None:
    fw = firewall()
    assert fw.process(back(SYN), 100.0) is DROP  # the server opens towards the client
    assert fw.process(tcp(CLIENT, 40000, SERVER, 22, SYN), 100.0) is DROP
    assert fw.dropped["not_allowed"] == 2


def test_an_ack_of_a_connection_never_opened_asks_the_store_and_is_dropped_when_absent() -> None:
    fw = firewall()
    key, _ = conn_key(out(ACK, 41000))
    assert fw.process(out(ACK, 41000), 100.0) == Wait("conns", key)
    fw.conns.loaded(key, None)
    assert fw.process(out(ACK, 41000), 100.0) is DROP
    fw.conns.settled(key)
    assert fw.dropped["no_connection"] == 1


def test_a_replica_that_never_saw_the_syn_passes_a_stored_connection_both_ways() -> None:
    one, other = firewall(), firewall()
    handshake(one)
    writes = one.conns.take_writes()
    key = writes[0].key
    assert other.process(back(ACK), 101.0) == Wait("conns", key)
    other.conns.loaded(key, writes[0].value)
    assert other.process(back(ACK), 101.0) is PASS
    other.conns.settled(key)
    assert other.process(out(ACK), 101.0) is PASS


def test_local_state_drops_a_connection_seen_elsewhere() -> None:
    one, other = firewall(state="local"), firewall(state="local")
    assert handshake(one) == [PASS, PASS, PASS]  # no store: no wait
    assert other.process(out(ACK), 101.0) is DROP  # the failover the reference design breaks


def test_fin_both_ways_then_time_wait_and_rst_deletes() -> None:
    fw = firewall()
    handshake(fw)
    commit_all(fw)
    key, _ = conn_key(out(ACK))
    assert fw.process(out(FIN | ACK), 101.0) is PASS
    assert fw.conns.peek(key).state == "F"
    assert fw.process(back(FIN | ACK), 101.0) is PASS
    assert fw.conns.peek(key).state == "T"
    assert fw.process(out(ACK), 101.0) is PASS
    writes = fw.conns.take_writes()
    assert writes[-1].key == key and parse_conn(writes[-1].value or b"").state == "T"
    handshake(fw, 102.0, sport=40001)
    commit_all(fw)
    assert fw.process(back(RST, 40001), 103.0) is PASS
    deleted = fw.conns.take_writes()
    assert [(w.key, w.value) for w in deleted] == [(conn_key(out(ACK, 40001))[0], None)]
    assert fw.process(out(ACK, 40001), 103.0) == Wait("conns", conn_key(out(ACK, 40001))[0])


def test_udp_and_icmp_replies_pass_only_after_a_request() -> None:
    fw = firewall()
    dns = Packet(CLIENT, 5353, 60, UDP, SERVER, 53)
    reply = Packet(SERVER, 53, 60, UDP, CLIENT, 5353)
    unsolicited = Packet(SERVER, 53, 60, UDP, CLIENT, 5354)
    assert fw.process(dns, 100.0) is PASS
    assert fw.process(reply, 100.0) is PASS
    assert fw.conns.peek(conn_key(dns)[0]).state == "A"
    key = conn_key(unsolicited)[0]
    assert fw.process(unsolicited, 100.0) == Wait("conns", key)
    ping = Packet(CLIENT, 7, 84, ICMP, SERVER, 7, 1, 8)
    pong = Packet(SERVER, 7, 84, ICMP, CLIENT, 7, 1, 0)
    assert fw.process(ping, 100.0) is PASS and fw.process(pong, 100.0) is PASS
    stray = Packet(SERVER, 9, 84, ICMP, CLIENT, 9, 1, 0)
    assert isinstance(fw.process(stray, 100.0), Wait)


def test_a_syn_flood_from_spoofed_sources_stays_in_memory_bounded_and_writes_nothing() -> None:
    fw = firewall(max_half_open=1000, allow=[{"proto": "tcp", "dport": 80}])
    for n in range(100_000):
        source = f"198.18.{(n >> 8) & 255}.{n & 255}"
        assert fw.process(tcp(source, 1024 + n % 60000, SERVER, 80, SYN), 100.0) is PASS
    assert len(fw.embryos) == 1000 and fw.evicted == 99_000
    assert fw.conns.queued == 0 and len(fw.conns) == 0
    # A legitimate handshake in the middle of it still completes.
    assert handshake(fw, sport=50000)[:2] == [PASS, PASS]


def test_one_source_holds_at_most_its_half_open_share() -> None:
    fw = firewall(max_half_open_per_source=3)
    verdicts = [fw.process(out(SYN, 40000 + n), 100.0) for n in range(5)]
    assert verdicts == [PASS, PASS, PASS, DROP, DROP]
    assert fw.dropped["half_open_full"] == 2


def test_a_replica_stores_at_most_its_share_of_max_connections() -> None:
    fw = Firewall(CONFIG | {"max_connections": 4}, Group(("r1", "r2"), "r1"))
    results = [handshake(fw, sport=40000 + n)[2] for n in range(3)]
    assert [isinstance(r, Wait) for r in results] == [True, True, False]
    assert results[2] is DROP and fw.dropped["table_full"] == 1


def test_a_connection_expires_and_its_renewal_is_written_half_a_timeout_late() -> None:
    fw = firewall(timeouts={"tcp_established": 10.0})
    handshake(fw)
    commit_all(fw)
    key, _ = conn_key(out(ACK))
    assert fw.process(out(ACK), 104.0) is PASS and fw.conns.queued == 0
    assert fw.process(out(ACK), 106.0) is PASS and fw.conns.queued == 1
    assert fw.conns.peek(key).expires == 116.0
    fw.idle(117.0)
    assert key not in fw.conns


def test_the_group_changing_makes_cached_connections_read_again() -> None:
    fw = firewall()
    handshake(fw)
    commit_all(fw)
    key, _ = conn_key(out(ACK))
    fw.update(group=Group(("r1", "r2"), "r1"))
    assert fw.process(out(ACK), 101.0) == Wait("conns", key)
    fw.conns.loaded(key, Conn(0, ESTABLISHED, 700.0).encode())
    assert fw.process(out(ACK), 101.0) is PASS
