"""Counting packets where they arrive: tcpdump in a namespace, per second and per source.

Used by the in-path tests, experiments, demo and bench to count what the
server received, independently of vmbox's own metrics (the issue's rule: count
at the server side). `Capture` runs `tcpdump -w` inside a namespace (vmbox.netns
.exec_argv) with a filter, waits until tcpdump is listening, and on stop reads
the file back with `tcpdump -r -tt -n` into (time, source) pairs; `per_second`
turns those into counts per whole epoch second. Nothing here parses packets
itself: tcpdump is the witness.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vmbox import netns

READY_TIMEOUT = 5.0
# "1796245684.123456 IP 198.18.0.10.2435 > 198.19.0.2.9000: UDP, length 0"
# "1796245684.123456 IP6 2001:2:0:1::a.80 > ...", "... IP 198.18.0.10 > 198.19.0.2: ICMP echo"
_LINE = re.compile(r"^(\d+\.\d+) IP6? ([0-9a-fA-F:.]+?)(?:\.(\d+))? > ")


class CaptureError(RuntimeError):
    """tcpdump could not start or read its file; str() is one line."""


class Capture:
    """tcpdump on `interface` in `namespace`, for packets matching `bpf`."""

    def __init__(
        self, namespace: str, interface: str, bpf: str, *, immediate: bool = False
    ) -> None:
        self.namespace = namespace
        self.interface = interface
        self.bpf = bpf
        # libpcap hands tcpdump its packets a buffer at a time, after up to 1 s, and tcpdump
        # stopped by SIGINT does not drain the buffer: a short run's packets, or the last
        # second's, were never written. `immediate` hands each over as it comes (more
        # wakeups: for sessions of a few thousand packets/s, not line-rate floods).
        self.immediate = immediate
        self._dir = tempfile.TemporaryDirectory(prefix="vmbox-capture-")
        self.path = Path(self._dir.name) / "capture.pcap"
        self._proc: subprocess.Popen[bytes] | None = None
        self.packets: list[tuple[float, str]] = []  # (epoch time, source address)

    def start(self) -> None:
        argv = ["tcpdump", "-i", self.interface, "-n", "-U", "-s", "128", "-w", str(self.path)]
        argv += ["--immediate-mode"] if self.immediate else []
        log = (Path(self._dir.name) / "stderr").open("wb")
        try:
            self._proc = subprocess.Popen(
                netns.exec_argv(self.namespace, [*argv, self.bpf]),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        except FileNotFoundError:
            raise CaptureError("tcpdump or ip not found: install tcpdump and iproute2") from None
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        stderr = Path(self._dir.name) / "stderr"
        while b"listening on" not in stderr.read_bytes():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                why = stderr.read_bytes().decode(errors="replace").strip().splitlines()
                raise CaptureError(f"tcpdump did not start: {why[-1] if why else 'no output'}")
            time.sleep(0.02)

    def stop(self) -> list[tuple[float, str]]:
        """Stop tcpdump and read what it captured."""
        if self._proc is None:
            return self.packets
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
        self._proc = None
        self.packets = self.read()
        return self.packets

    def read(self) -> list[tuple[float, str]]:
        """(time, source) of the packets in the file so far; tcpdump may still be running
        (a packet half written at the end is left out: what came before it is good)."""
        return list(parse(self.lines()))

    def lines(self) -> list[str]:
        """tcpdump's own text of the packets in the file so far (`-n -tt`), one per line:
        for callers that read more than the source (vmbox.tools.tcpgaps)."""
        done = subprocess.run(
            ["tcpdump", "-r", str(self.path), "-n", "-tt"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0 and not done.stdout and self._proc is None:
            raise CaptureError(f"tcpdump -r: {' '.join(done.stderr.split())[:200]}")
        return done.stdout.splitlines()

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self._kill()
        self._dir.cleanup()

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.stop()
        finally:
            self.close()


def parse(lines: Iterable[str]) -> Iterator[tuple[float, str]]:
    """(time, source address) of each IP packet line tcpdump printed."""
    for line in lines:
        match = _LINE.match(line)
        if match:
            yield float(match[1]), match[2]


def per_second(packets: Sequence[tuple[float, str]], source: str | None = None) -> dict[int, int]:
    """Packets per whole epoch second (from `source` only, when given)."""
    counts = Counter(int(when) for when, src in packets if source is None or src == source)
    return dict(sorted(counts.items()))


def full_seconds(counts: dict[int, int], start: float, end: float) -> list[int]:
    """The counts of the seconds wholly inside [start, end] (zeros included)."""
    first, last = int(start) + 1, int(end) - 1
    return [counts.get(second, 0) for second in range(first, last + 1)]
