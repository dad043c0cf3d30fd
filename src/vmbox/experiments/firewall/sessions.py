"""The real clients of the failover and resize parts: an iperf3 stream and an HTTP download.

Called by failover.py and resize.py. `Traffic` runs, through one service, an
iperf3 TCP stream (vmbox.labtraffic.TcpStream) with a capture of its packets
at the server beside it (what witness.py reads), and a curl download
(HttpDownload), which it can start again until its connection lands on a
chosen replica (the steering's hash puts each connection where it puts it:
a replica's `vmbox_firewall_opened` grows by one when it stores a new
connection, which is how the download's replica is known). A `with` block ends
every process and the capture whatever happens.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType

from vmbox.experiments.firewall.setup import HTTP_TRIES, OPENED, State, replica_values
from vmbox.experiments.firewall.witness import data_segments, window_gap
from vmbox.lab import LabPlan
from vmbox.lab.plan import SERVER_IF
from vmbox.labtraffic import (
    GRACE,
    HTTP_PORT,
    STREAM_PORT,
    DownloadResult,
    HttpDownload,
    StreamResult,
    TcpStream,
)
from vmbox.testbed import Service
from vmbox.tools import tcpgaps
from vmbox.tools.capture import Capture

# bytes/s. The server's packets come as large as its pacing lets them: through the
# firewall, 250 kB/s left 261 ms between them (65 KB each) and hid any shorter stall;
# 1 MB/s leaves about 50 ms.
DOWNLOAD_RATE = 1_000_000
LANDED_WITHIN = 1.0  # s a download's connection gets to show on a replica


@dataclass(frozen=True)
class SessionRun:
    """One run of the stream and the download through a service, and what the server saw."""

    part: str  # "failover" or "resize"
    state: State
    stream: StreamResult
    download: DownloadResult
    data: tuple[tcpgaps.Segment, ...]  # the stream's data segments at the server
    began: float  # epoch: the stream's client started
    ends: float  # epoch: when its client was to stop sending (began + its seconds)
    on_killed: bool | None = None  # failover: the download's connection was on the killed one

    @property
    def gap(self) -> float | None:
        """The longest time without the stream's data at the server, from its first data
        packet until `ends`: a stream that stopped for good stalled until then (labtraffic's
        capture_stall leaves that out when iperf3 exits 0, which it does when only the
        data connection broke). None: no data seen."""
        times = [s.at for s in self.data]
        return window_gap(times, min(times), self.ends) if times else None

    @property
    def stream_broke(self) -> bool:
        """The stream did not come through: not completed, or a second or more without data
        (the server's gap, or iperf3's run of empty intervals)."""
        stalled = max(self.gap or 0.0, self.stream.stall) >= 1.0
        return not self.stream.completed or stalled or not self.data

    @property
    def stream_held(self) -> bool:
        """Completed on its one data connection (no reconnect)."""
        return self.stream.completed and self.stream.data_connections == 1

    @property
    def download_held(self) -> bool:
        return self.download.completed and self.download.num_connects == 1


class Traffic:
    """A stream of `seconds` with its capture, and a download lasting about as long; each
    client is stopped `grace` s past its planned end if it has not ended (labtraffic)."""

    def __init__(self, lab: LabPlan, seconds: int, grace: float = GRACE) -> None:
        self.lab, self.seconds, self.grace = lab, seconds, grace
        server = str(lab.describe()["server"]["address"])
        bpf = f"tcp and dst host {server} and dst port {STREAM_PORT}"
        self.capture = Capture(lab.namespace("server"), SERVER_IF, bpf, immediate=True)
        self.stream = TcpStream(lab, seconds, grace=grace)  # from the first client address
        self.download: HttpDownload | None = None
        self.began = 0.0  # epoch
        self._tries = 0

    def start_stream(self) -> float:
        """Capture, then the stream; when it started (time.monotonic)."""
        self.capture.start()
        self.stream.start()
        self.began = time.time()
        return time.monotonic()

    def _new_download(self, size: int) -> HttpDownload:
        """A download from the next client address to a server of its own on the next
        port (a rejected one goes on until a later one has landed)."""
        sources = self.lab.client_addresses
        self._tries += 1
        source, port = sources[self._tries % len(sources)], HTTP_PORT + self._tries - 1
        return HttpDownload(
            self.lab, size, DOWNLOAD_RATE, port=port, source=source, grace=self.grace
        )

    async def download_on(self, svc: Service, rid: str | None, latest: float) -> bool | None:
        """Start the download (to last until the stream's end); with `rid`, start another,
        up to HTTP_TRIES and not past `latest` (time.monotonic), until one's connection is on
        that replica, and end the others. Whether it is (None: no replica asked for).

        Each is known by the replica whose stored connections grew once it started; the
        others run on meanwhile, since one that ends takes its connection from its
        replica's count at a moment of its own."""
        size = DOWNLOAD_RATE * self.seconds
        rejected: list[HttpDownload] = []
        try:
            for attempt in range(HTTP_TRIES):
                before = await replica_values(svc, OPENED)
                download = self._new_download(size)
                await asyncio.to_thread(download.start)
                where = await _landed(svc, before)
                last = attempt == HTTP_TRIES - 1 or time.monotonic() + 0.5 > latest
                if rid is None or where == rid or last:
                    self.download = download
                    return None if rid is None else where == rid
                rejected.append(download)
        finally:
            for download in rejected:
                await asyncio.to_thread(download.close)
        return None  # not reached: the last attempt is kept

    async def results(self, part: str, state: State, on_killed: bool | None = None) -> SessionRun:
        """Wait for the stream's and the download's ends (each bounded by labtraffic)."""
        if self.download is None:
            raise RuntimeError("Traffic: no download was started")
        stream, download = await asyncio.gather(
            asyncio.to_thread(self.stream.result), asyncio.to_thread(self.download.result)
        )
        await asyncio.to_thread(self.capture.stop)
        segments = list(tcpgaps.parse(await asyncio.to_thread(self.capture.lines)))
        data = tuple(data_segments(segments))
        ends = self.began + self.seconds
        return SessionRun(part, state, stream, download, data, self.began, ends, on_killed)

    def close(self) -> None:
        try:
            self.stream.close()
            if self.download is not None:
                self.download.close()
        finally:
            self.capture.close()

    def __enter__(self) -> Traffic:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _landed(svc: Service, before: dict[str, tuple[float, int]]) -> str | None:
    """The replica whose stored connections grew since `before` (the one new connection's),
    polled for up to LANDED_WITHIN s; None if none did."""
    deadline = time.monotonic() + LANDED_WITHIN
    while time.monotonic() < deadline:
        now = await replica_values(svc, OPENED)
        grown = [rid for rid, (n, _) in now.items() if n > before.get(rid, (n, 0))[0]]
        if grown:
            return grown[0]
        await asyncio.sleep(0.05)
    return None
