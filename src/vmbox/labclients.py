"""Real clients in a lab, and what the server counted: for the in-path demo and experiments.

`lab_for` builds a lab of network namespaces with a name of its own and
always removes it (on an error or Ctrl-C too). `Flood` runs hping3 from one
client address at a fixed rate (a new source port per packet, so one address
over many flows, or one flow with `flows=1`), bounded in count and time.
`ServerCount` counts what reached the server per second and per source with
tcpdump in the server's namespace (vmbox.tools.capture), never with vmbox's
own metrics; `read` reads its file while it still runs, for live
views. `ping_rtts` is ping's per-packet round trips between client and server.
Used by vmbox.demo and the in-path experiments (vmbox.experiments.inpath).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vmbox.lab import LabError, LabPlan, down, exec_argv, up
from vmbox.lab.plan import SERVER_IF
from vmbox.tools.capture import Capture

TOOLS = (
    ("hping3", "hping3"),
    ("tcpdump", "tcpdump"),
    ("iptables", "iptables"),
    ("ping", "iputils-ping"),
)
PORT = 9000  # where the floods go; nothing listens (UDP gets port unreachable, SYNs a reset)
_RTT = re.compile(r"time=([0-9.]+) ms")


def require_inpath(what: str) -> None:
    """Return when `what` can build a lab and run its clients here; a one-line LabError if not."""
    if os.geteuid() != 0:
        raise LabError(
            f"{what} needs root: it builds a lab of network namespaces (run it with sudo)"
        )
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            raise LabError(
                f"{what} needs `{tool}`: `make tools` installs it (apt-get install {package})"
            )


def unique_prefix(base: str) -> str:
    """A lab name nobody else uses: `base` and this process's id."""
    return f"{base}{os.getpid()}"


@contextmanager
def lab_for(prefix: str, clients: int, nodes: int = 0) -> Iterator[LabPlan]:
    """A fresh lab named `prefix` with `clients` client addresses (a fleet of `nodes` nodes
    when given); removed afterwards whatever happened. Stop services whose replicas bound
    queues in it before leaving the block."""
    plan = LabPlan(prefix, clients, nodes)
    try:
        up(plan, replace=True)
        yield plan
    finally:
        down(plan.prefix)


def server_address(plan: LabPlan) -> str:
    return str(plan.describe()["server"]["address"])


class Flood:
    """hping3 from `source` (a client address of the lab) to the server at `rate` packets/s for
    `seconds`: `proto` udp (datagrams) or tcp (SYNs); a new source port per packet unless
    `flows=1` or a `sport` is given (then one flow). A context manager: the process is gone
    when the block ends."""

    def __init__(
        self,
        plan: LabPlan,
        proto: str,
        source: str,
        rate: float,
        seconds: float,
        flows: int = 0,
        sport: int | None = None,
    ) -> None:
        flag = {"udp": ["--udp"], "tcp": ["-S"]}[proto]
        if flows == 1 and sport is None:
            sport = 20_000 + int(source.rsplit(".", 1)[-1])
        keep = ["-k", "-s", str(sport)] if sport is not None else []
        argv = [
            "hping3",
            *flag,
            *keep,
            "-a",
            source,
            "-p",
            str(PORT),
            "-i",
            f"u{int(1_000_000 / rate)}",
            "-c",
            str(max(1, int(rate * seconds))),
            server_address(plan),
        ]
        self.argv = exec_argv("client", argv, plan.prefix)
        self.seconds = seconds
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None  # hping3's, once stopped
        self.said = ""  # its stderr, once stopped

    def __enter__(self) -> Flood:
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.terminate()
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.returncode = self._proc.returncode
        if self._proc.stderr is not None:
            # What hping3 said (bounded): a flood that sent nothing says why here.
            self.said = self._proc.stderr.read(4096).decode(errors="replace").strip()
            self._proc.stderr.close()
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerCount(Capture):
    """tcpdump at the server's interface of TCP and UDP packets from the lab's clients."""

    def __init__(self, plan: LabPlan, sources: list[str]) -> None:
        hosts = " or ".join(f"src host {s}" for s in sources)
        super().__init__(plan.namespace("server"), SERVER_IF, f"(udp or tcp) and ({hosts})")

    def __enter__(self) -> ServerCount:
        self.start()
        return self


def ping_rtts(plan: LabPlan, count: int, interval: float) -> list[float]:
    """Round trips (ms) of `count` pings from the first client to the server, every `interval` s."""
    argv = ["ping", "-n", "-i", f"{interval:g}", "-c", str(count), "-W", "1", server_address(plan)]
    done = subprocess.run(
        exec_argv("client", argv, plan.prefix),
        capture_output=True,
        text=True,
        timeout=count * interval + 20,
        check=False,
    )
    return [float(m) for m in _RTT.findall(done.stdout)]


def wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))
