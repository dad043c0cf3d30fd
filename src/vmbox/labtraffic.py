"""TCP and UDP sessions of real clients through a lab, measured at the server.

For the tests and experiments of an in-path stateful firewall: clients that
nobody here wrote (iperf3, curl, hping3) run inside a lab's namespaces
(vmbox.lab), and tcpdump at the server (vmbox.tools.capture, read with
vmbox.tools.tcpgaps) says what crossed the gateway and when.

- `TcpStream` / `tcp_stream`: one iperf3 TCP stream; `HttpDownload` /
  `http_download`: curl fetching a file of a given size, the server pacing the
  connection so it lasts size/rate seconds. Both are background sessions:
  `start()` returns at once, `result()` waits (a test kills a replica in
  between); a `with` block ends every process whatever happens.
- `ack_scan` (hping3 -A to ports nobody uses), `syn_flood` (hping3 -S from
  random sources), `server_opens` (a connection the server opens towards the
  client side) and `udp_exchange` (iperf3 -u -R: a datagram out, the server's
  datagrams back): short runs that return when done.

Every load is bounded in count and time. Every process runs under coreutils'
`timeout` in a process group of its own (vmbox.lab.procs), so it ends by
itself past its bound even if nobody stops it, and is killed (the whole
group) and reaped when its call or block ends. Nothing here touches the
host's namespace. A sibling of vmbox.labclients and vmbox.labload (pyproject's
layers): it imports neither. Measured on a lab with no firewall: DESIGN.md
"Lab", "Sessions of real clients".
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from vmbox.lab import LabError, LabPlan
from vmbox.lab.plan import CLIENT_IF, CLIENT_NET4, SERVER_IF, SERVER_RETURN_IF
from vmbox.lab.procs import (
    KILL_AFTER,
    READY_TIMEOUT,
    finish,
    kill,
    last_line,
    spawn,
    wait_listening,
)
from vmbox.tools import tcpgaps
from vmbox.tools.capture import Capture

# Seconds a client may run past its planned end before it is killed (TcpStream and
# HttpDownload take another: a run that breaks its sessions on purpose need not wait).
GRACE = 10.0
INTERVAL = 0.1  # iperf3's report interval: the finest it takes
STREAM_PORT, UDP_PORT, HTTP_PORT, OPEN_PORT, SCAN_PORT = 5401, 5402, 80, 8080, 20000
STREAM_RATE = "50M"  # bits/s: packets every few ms, so a gap shows; little CPU and capture
_MARTIAN_NETS = ipaddress.IPv4Network("0.0.0.0/32"), ipaddress.IPv4Network("255.255.255.255/32")
_CURL_OUT = "%{http_code} %{num_connects} %{size_download} %{time_total}"
_HPING = re.compile(r"(\d+) packets transmitted, (\d+) packets received")
# curl's limit-rate (7.88) reads in bursts and sleeps up to seconds between them, and
# the kernel's receive buffer takes a whole file at once: the server paces instead, with
# the kernel's own TCP pacing (SO_MAX_PACING_RATE, 47 on Linux) on each connection.
_PACED_HTTP = """
import functools, http.server, socket, sys
host, port, root, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
class Paced(http.server.SimpleHTTPRequestHandler):
    def setup(self):
        super().setup()
        if rate:
            self.request.setsockopt(socket.SOL_SOCKET, 47, rate)
    def log_message(self, *args):
        pass
handler = functools.partial(Paced, directory=root)
http.server.ThreadingHTTPServer((host, port), handler).serve_forever()
"""


def _server(plan: LabPlan) -> str:
    return str(plan.describe()["server"]["address"])


def _json(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except ValueError:  # killed before it printed, or printed half
        return {}
    return found if isinstance(found, dict) else {}


def _pace(rate: float) -> str:
    return f"u{max(1, int(1_000_000 / rate))}"


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One iperf3 TCP stream, client to server."""

    completed: bool  # iperf3 exited 0 and reported no error
    error: str  # iperf3's error (or its last stderr line), "" when completed
    # The server's figures; when the run failed before the server reported, the client's
    # (bytes it sent: its socket buffer hides a short stall).
    bytes: int
    bits_per_second: float
    intervals: tuple[int, ...]  # bytes per INTERVAL s
    stall: float  # seconds: the longest run of empty intervals
    capture_stall: float | None  # seconds between data packets at the server (None: none seen)
    retransmits: int  # the sender's, as iperf3 reports them
    connections: int  # opened to the iperf3 port, seen at the server: control + data

    @property
    def data_connections(self) -> int:
        """Data connections (the control connection is the first): 1, unless it reconnected."""
        return max(0, self.connections - 1)


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """One HTTP download by curl."""

    completed: bool  # curl exited 0 with HTTP 200 and the whole file
    exit_code: int  # curl's (28: its --max-time passed)
    http_code: int
    num_connects: int  # curl's %{num_connects}
    size: int  # bytes curl downloaded
    seconds: float  # curl's %{time_total}
    stall: float | None  # seconds between data packets leaving the server (None: none seen)
    accepted: int  # connections the server accepted (SYN-ACKs it sent)
    error: str  # curl's stderr, "" when completed


@dataclass(frozen=True, slots=True)
class ScanResult:
    sent: int  # hping3's count
    reached: int  # ACKs seen at the server's interface
    answered: int  # replies hping3 got (resets from the server's kernel)


@dataclass(frozen=True, slots=True)
class FloodResult:
    sent: int  # hping3's count
    seconds: float  # hping3's run, with the up to 1 s it waits for answers after the last
    offered: int  # SYNs that left the client's interface
    offered_rate: float  # packets/s between the first and the last of them
    routable: int  # of those, from a source a router forwards (not martian: `martian`)
    reached: int  # SYNs at the server's interface
    sources: int  # distinct source addresses among them


@dataclass(frozen=True, slots=True)
class OpenResult:
    connected: bool  # curl exited 0 with HTTP 200
    exit_code: int  # curl's (7: refused, 28: timed out)
    http_code: int
    seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class UdpResult:
    completed: bool
    error: str
    packets: int  # datagrams the server sent, as the client's iperf3 counts them
    lost: int  # of those, never received

    @property
    def received(self) -> int:
        return self.packets - self.lost


class _Session:
    """A background session: its processes and a capture at the server, ended by close()."""

    def __init__(self, plan: LabPlan) -> None:
        self.plan = plan
        self._procs: list[subprocess.Popen[str]] = []
        self._capture: Capture | None = None
        self._client: subprocess.Popen[str] | None = None
        self._root: tempfile.TemporaryDirectory[str] | None = None  # files a server serves

    def _fresh(self) -> None:
        if self._procs or self._capture is not None:
            raise LabError(f"{type(self).__name__}: start() once; make another for a new run")

    def _watch(self, interface: str, bpf: str) -> None:
        self._capture = Capture(self.plan.namespace("server"), interface, bpf, immediate=True)
        self._capture.start()

    def _own(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        self._procs.append(proc)
        return proc

    def _segments(self) -> list[tcpgaps.Segment]:
        if self._capture is None:
            return []
        self._capture.stop()
        return list(tcpgaps.parse(self._capture.lines()))

    def _started(self) -> subprocess.Popen[str]:
        if self._client is None:
            raise LabError(f"{type(self).__name__}: start() it first")
        return self._client

    def running(self) -> bool:
        return self._client is not None and self._client.poll() is None

    def close(self) -> None:
        try:
            for proc in reversed(self._procs):
                kill(proc)
        finally:
            if self._capture is not None:
                self._capture.close()
            if self._root is not None:
                self._root.cleanup()

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpStream(_Session):
    """iperf3 TCP from a client address to a one-shot iperf3 server for `seconds`, at
    `rate` (iperf3's -b; None: as fast as it goes), reported every INTERVAL s."""

    def __init__(
        self,
        plan: LabPlan,
        seconds: int,
        *,
        rate: str | None = STREAM_RATE,
        port: int = STREAM_PORT,
        source: str | None = None,
        grace: float = GRACE,
    ) -> None:
        if int(seconds) != seconds or seconds < 1:
            raise LabError(
                "tcp_stream: give whole seconds, at least 1 (iperf3 -t takes no fraction)"
            )
        super().__init__(plan)
        self.seconds, self.rate, self.port = seconds, rate, port
        self.source = source or plan.client_addresses[0]
        self.grace = grace  # s the client may run past its planned end (GRACE)
        self._began = 0.0

    def start(self) -> Self:
        server, bound, port = _server(self.plan), self.seconds + self.grace, str(self.port)
        self._fresh()
        try:
            self._watch(SERVER_IF, f"tcp and dst host {server} and dst port {port}")
            argv = ["iperf3", "-s", "-1", "-p", port, "-i", str(INTERVAL), "-J"]
            listener = self._own(spawn(self.plan, "server", argv, bound + READY_TIMEOUT))
            wait_listening(self.plan, "server", self.port, listener)
            argv = ["iperf3", "-c", server, "-B", self.source, "-p", port, "-J"]
            argv += ["-t", str(self.seconds), "-i", str(INTERVAL), "--get-server-output"]
            argv += ["-b", self.rate] if self.rate else []
            self._client = self._own(spawn(self.plan, "client", argv, bound))
            self._began = time.monotonic()
        except BaseException:
            self.close()
            raise
        return self

    def result(self) -> StreamResult:
        """Wait for the stream's end (interrupted `seconds + grace` after the start) and
        measure it."""
        client = self._started()
        try:
            # Past timeout's SIGINT (iperf3 then prints what it has) and its SIGKILL.
            deadline = self._began + self.seconds + self.grace + KILL_AFTER + 2
            code, out, err = finish(client, deadline)
            ended = time.time()
            segments = self._segments()
        finally:
            self.close()
        return stream_result(_json(out), code, err, segments, ended)


def stream_result(
    report: dict[str, Any],
    code: int,
    stderr: str,
    segments: Sequence[tcpgaps.Segment],
    ended: float,
) -> StreamResult:
    """Pure: iperf3's client JSON (with the server's), its exit, and the packets the server
    received on the iperf3 port, as a StreamResult. `ended`: when the client exited (epoch)."""
    error = str(report.get("error") or "")
    if code != 0 and not error:
        error = last_line(stderr) or f"iperf3 exited with {code}"
    completed = code == 0 and not error
    served = report.get("server_output_json") or {}
    intervals = [i["sum"] for i in served.get("intervals") or report.get("intervals") or []]
    end = report.get("end") or {}
    received = end.get("sum_received") or {}
    opened = tcpgaps.opened(segments)
    control = opened[0] if opened else None
    data = [s.at for s in segments if s.length > 0 and (s.src, s.sport) != control]
    return StreamResult(
        completed=completed,
        error=error,
        bytes=int(received.get("bytes", sum(int(i["bytes"]) for i in intervals))),
        bits_per_second=float(received.get("bits_per_second", 0.0)),
        intervals=tuple(int(i["bytes"]) for i in intervals),
        stall=empty_run([(float(i["seconds"]), int(i["bytes"])) for i in intervals]),
        capture_stall=tcpgaps.longest_gap(data, None if completed else ended) if data else None,
        retransmits=int((end.get("sum_sent") or {}).get("retransmits", 0)),
        connections=len(opened),
    )


def empty_run(intervals: Sequence[tuple[float, int]]) -> float:
    """Pure: the longest run of (seconds, bytes) intervals with no byte, in seconds."""
    longest = run = 0.0
    for seconds, count in intervals:
        run = run + seconds if count == 0 else 0.0
        longest = max(longest, run)
    return longest


def tcp_stream(
    plan: LabPlan,
    seconds: int,
    *,
    rate: str | None = STREAM_RATE,
    port: int = STREAM_PORT,
    source: str | None = None,
) -> StreamResult:
    """One TcpStream, run to its end."""
    with TcpStream(plan, seconds, rate=rate, port=port, source=source) as stream:
        return stream.result()


class HttpDownload(_Session):
    """curl downloading a file of `size` bytes from an HTTP server in the server's
    namespace, at `rate` bytes/s: `pace="server"` paces the server's side of the
    connection (smooth: a packet every few ms), `"curl"` uses curl's --limit-rate instead
    (7.88 reads in bursts with pauses of up to 2.6 s between them, measured, and the
    server may send the whole file into the client's buffer at once)."""

    def __init__(
        self,
        plan: LabPlan,
        size: int,
        rate: int,
        *,
        port: int = HTTP_PORT,
        pace: Literal["server", "curl"] = "server",
        source: str | None = None,
        grace: float = GRACE,
    ) -> None:
        if size <= 0 or rate <= 0:
            raise LabError("http_download: give a positive size and rate")
        super().__init__(plan)
        self.size, self.rate, self.port, self.pace = size, rate, port, pace
        self.source = source or plan.client_addresses[0]
        self.bound = size / rate + grace  # curl gives up this long after its start
        self._began = 0.0

    def start(self) -> Self:
        server, port = _server(self.plan), str(self.port)
        out_if = SERVER_RETURN_IF if self.plan.fleet else SERVER_IF  # a fleet answers directly
        self._fresh()
        try:
            self._root = root = tempfile.TemporaryDirectory(prefix="vmbox-http-")
            with (Path(root.name) / "file").open("wb") as file:
                file.truncate(self.size)  # sparse: reads as zeros
            self._watch(out_if, f"tcp and src host {server} and src port {port}")
            paced = str(self.rate if self.pace == "server" else 0)
            argv = [sys.executable, "-c", _PACED_HTTP, server, port, root.name, paced]
            listener = self._own(spawn(self.plan, "server", argv, self.bound + READY_TIMEOUT))
            wait_listening(self.plan, "server", self.port, listener)
            argv = ["curl", "-sS", "-o", "/dev/null", "--interface", self.source]
            argv += ["--max-time", f"{self.bound:.1f}", "-w", _CURL_OUT]
            argv += ["--limit-rate", str(self.rate)] if self.pace == "curl" else []
            argv.append(f"http://{server}:{port}/file")
            self._client = self._own(spawn(self.plan, "client", argv, self.bound + 2))
            self._began = time.monotonic()
        except BaseException:
            self.close()
            raise
        return self

    def result(self) -> DownloadResult:
        """Wait for curl's end (it gives up `size / rate + grace` s after the start)."""
        client = self._started()
        try:
            code, out, err = finish(client, self._began + self.bound + 2 + KILL_AFTER + 2)
            ended = time.time()
            segments = self._segments()
        finally:
            self.close()
        fields = (out.split() + ["0"] * 4)[:4]
        http_code, connects, size = (int(float(f)) for f in fields[:3])
        data = [s.at for s in segments if s.length > 0]
        completed = code == 0 and http_code == 200 and size == self.size
        return DownloadResult(
            completed=completed,
            exit_code=code,
            http_code=http_code,
            num_connects=connects,
            size=size,
            seconds=float(fields[3]),
            stall=tcpgaps.longest_gap(data, None if completed else ended) if data else None,
            accepted=len(tcpgaps.accepted(segments)),
            error="" if completed else last_line(err) or f"HTTP {http_code}, {size} bytes",
        )


def http_download(
    plan: LabPlan,
    size: int,
    rate: int,
    *,
    port: int = HTTP_PORT,
    pace: Literal["server", "curl"] = "server",
    source: str | None = None,
) -> DownloadResult:
    """One HttpDownload, run to its end."""
    with HttpDownload(plan, size, rate, port=port, pace=pace, source=source) as download:
        return download.result()


def _hping3(plan: LabPlan, argv: list[str], bound: float) -> tuple[int, int]:
    """Run hping3 in the client's namespace for at most `bound` s: (sent, received)."""
    proc = spawn(plan, "client", argv, bound)
    try:
        _, out, err = finish(proc, time.monotonic() + bound + 4)
    finally:
        kill(proc)
    found = _HPING.search(out + err)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def ack_scan(
    plan: LabPlan,
    count: int,
    *,
    rate: float = 1000.0,
    first_port: int = SCAN_PORT,
    source: str | None = None,
) -> ScanResult:
    """`count` TCP ACKs (no SYN before them) from a client address to the server's ports
    first_port.. (one each, nothing listens there), `rate` a second: how many reached the
    server. A stateful firewall drops them all; without one, each draws a reset."""
    if count <= 0 or rate <= 0 or first_port + count > 65536:
        raise LabError("ack_scan: give a positive count and rate, and ports up to 65535")
    src, last = source or plan.client_addresses[0], first_port + count - 1
    bpf = f"tcp and src host {src} and dst portrange {first_port}-{last}"
    bpf += " and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-ack"
    argv = ["hping3", "-q", "-A", "-a", src, "-p", f"++{first_port}", "-c", str(count)]
    argv += ["-i", _pace(rate), _server(plan)]
    with Capture(plan.namespace("server"), SERVER_IF, bpf, immediate=True) as at_server:
        sent, answered = _hping3(plan, argv, count / rate + 1 + GRACE)
    return ScanResult(sent, len(at_server.packets), answered)


def syn_flood(plan: LabPlan, count: int, rate: float, *, port: int = HTTP_PORT) -> FloodResult:
    """`count` SYNs to the server's `port` at `rate` a second (as far as hping3's pacing
    goes), each from a random source address (hping3 --rand-source: any IPv4 address,
    not only the lab's 198.18.0.0/15; they stay in the lab, which has no route out, and
    the gateway drops the martian ones, `routable` leaves them out). Counted as they
    leave the client and at the server."""
    if count <= 0 or rate <= 0:
        raise LabError("syn_flood: give a positive count and rate")
    bpf = f"tcp dst port {port} and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    bpf += f" and not src net {CLIENT_NET4}"  # the lab's own clients' connections
    argv = ["hping3", "-q", "-S", "--rand-source", "-p", str(port), "-c", str(count)]
    argv += ["-i", _pace(rate), _server(plan)]
    with (
        Capture(plan.namespace("server"), SERVER_IF, bpf, immediate=True) as at_server,
        Capture(plan.namespace("client"), CLIENT_IF, bpf, immediate=True) as at_client,
    ):
        began = time.monotonic()
        sent, _ = _hping3(plan, argv, count / rate + 1 + GRACE)
        ran = time.monotonic() - began
    times = sorted(when for when, _ in at_client.packets)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return FloodResult(
        sent=sent,
        seconds=ran,
        offered=len(times),
        offered_rate=(len(times) - 1) / span if span else 0.0,
        routable=sum(1 for _, source in at_client.packets if not martian(source)),
        reached=len(at_server.packets),
        sources=len({source for _, source in at_server.packets}),
    )


def martian(source: str) -> bool:
    """Pure: whether Linux drops a packet from `source` as it routes it (a martian source:
    multicast, loopback, 0.0.0.0, limited broadcast; the rest of 0/8 was forwarded, as
    measured on this kernel, 6.18): about 6.6% of random IPv4 addresses."""
    address = ipaddress.IPv4Address(source)
    return (
        address.is_multicast or address.is_loopback or any(address in net for net in _MARTIAN_NETS)
    )


def server_opens(
    plan: LabPlan, port: int = OPEN_PORT, *, timeout: float = 2.0, address: str | None = None
) -> OpenResult:
    """A connection the server side opens towards the client side: `python -m http.server`
    listening on a client address, curl from the server's namespace (connect timeout
    `timeout` s). A firewall that lets only the client side open connections stops it."""
    target = address or plan.client_addresses[0]
    with tempfile.TemporaryDirectory(prefix="vmbox-open-") as root:
        argv = [sys.executable, "-m", "http.server", str(port), "--bind", target]
        listener = spawn(plan, "client", [*argv, "--directory", root], timeout + 2 * GRACE)
        try:
            wait_listening(plan, "client", port, listener)
            argv = ["curl", "-sS", "-o", "/dev/null", "--connect-timeout", f"{timeout:g}"]
            argv += ["--max-time", f"{timeout + 2:g}", "-w", "%{http_code}"]
            began = time.monotonic()
            curl = spawn(plan, "server", [*argv, f"http://{target}:{port}/"], timeout + GRACE)
            try:
                code, out, err = finish(curl, began + timeout + GRACE + 4)
            finally:
                kill(curl)
            took = time.monotonic() - began
        finally:
            kill(listener)
    http_code = int(out.strip() or 0)
    connected = code == 0 and http_code == 200
    return OpenResult(connected, code, http_code, took, "" if connected else last_line(err))


def udp_exchange(
    plan: LabPlan,
    seconds: int = 1,
    *,
    rate: str = "1M",
    size: int = 500,
    port: int = UDP_PORT,
    source: str | None = None,
) -> UdpResult:
    """A UDP session the client starts and the server answers: iperf3 -u -R (the client's
    first datagram, then the server's datagrams of `size` bytes at `rate` bits/s back on
    the same addresses and ports) for `seconds`. Its control connection is TCP."""
    if int(seconds) != seconds or seconds < 1:
        raise LabError("udp_exchange: give whole seconds, at least 1 (iperf3 -t takes no fraction)")
    server, src = _server(plan), source or plan.client_addresses[0]
    argv = ["iperf3", "-s", "-1", "-p", str(port)]
    listener = spawn(plan, "server", argv, seconds + GRACE + READY_TIMEOUT)
    try:
        wait_listening(plan, "server", port, listener)
        argv = ["iperf3", "-c", server, "-B", src, "-p", str(port), "-u", "-R", "-J"]
        argv += ["-t", str(seconds), "-b", rate, "-l", str(size)]
        client = spawn(plan, "client", argv, seconds + GRACE)
        try:
            code, out, err = finish(client, time.monotonic() + seconds + GRACE + 4)
        finally:
            kill(client)
    finally:
        kill(listener)
    report = _json(out)
    error = str(report.get("error") or "")
    if code != 0 and not error:
        error = last_line(err) or f"iperf3 exited with {code}"
    sums = (report.get("end") or {}).get("sum") or {}
    packets, lost = int(sums.get("packets", 0)), int(sums.get("lost_packets", 0))
    return UdpResult(code == 0 and not error, error, packets, lost)
