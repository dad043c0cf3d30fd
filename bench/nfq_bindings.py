"""Pick the netfilter-queue binding by measurement (docs/nfqueue.md has the figures).

Run as root: `python bench/nfq_bindings.py [--seconds 5] [--repeat 3]`. It makes
one network namespace (loopback only), offers 64-byte UDP from `iperf3 -u -l 64
-b 0` (a generator in C) to an iperf3 server inside it, and counts what the
server received per second: with no queue rule, and with an
`iptables -A INPUT -p udp --dport 5201 -j NFQUEUE` rule and one of the
consumers below (accept everything, in Python). The namespace and every
process are removed at exit, whatever happens.

Consumers (`python bench/nfq_bindings.py consume NAME QUEUE`, run inside the
namespace by the bench itself):
- netfilterqueue-asyncio: the fd on uvloop's add_reader, `run(block=False)`
  per wakeup (recv until EAGAIN, one callback and one verdict per packet).
- netfilterqueue-blocking: `run()` in the main thread.
- fnfqueue: the documented loop, `for p in conn: p.accept()` (the library's
  own reader thread receives with recvmmsg; one verdict per packet).
- driver: vmbox.dataplane.nfqueue.NfqueueDriver with a decide that passes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

PORT = 5201
QUEUE = 7


def _consume(name: str, queue: int) -> None:
    count = 0
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True
        print(json.dumps({"count": count}), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if name.startswith("netfilterqueue"):
        from netfilterqueue import NetfilterQueue

        def accept(pkt: object) -> None:
            nonlocal count
            count += 1
            pkt.accept()  # type: ignore[attr-defined]

        nfq = NetfilterQueue()
        nfq.bind(queue, accept, max_len=4096, range=128)
        print("ready", flush=True)
        if name == "netfilterqueue-blocking":
            nfq.run()
        else:
            import asyncio

            import uvloop

            async def main() -> None:
                loop = asyncio.get_running_loop()
                loop.add_reader(nfq.get_fd(), nfq.run, False)
                await asyncio.Event().wait()

            uvloop.run(main())
    elif name == "fnfqueue":
        import fnfqueue

        conn = fnfqueue.Connection()
        q = conn.bind(queue)
        q.set_mode(128, fnfqueue.COPY_PACKET)
        q.set_maxlen(4096)
        print("ready", flush=True)
        while True:
            try:
                for p in conn:
                    count += 1
                    p.accept()
            except fnfqueue.BufferOverflowException:
                # ENOBUFS: the socket buffer overflowed; the kernel dropped
                # some packets. Clear it and go on, as the library documents.
                conn.reset()
    elif name == "driver":
        import asyncio

        import uvloop

        from vmbox.dataplane.counters import Counters
        from vmbox.dataplane.nfqueue import NfqueueDriver
        from vmbox.packet import Verdict

        counters = Counters()

        def on_term_driver(*_: object) -> None:
            print(json.dumps({"count": counters.received, **counters.snapshot()}), flush=True)
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term_driver)

        async def run_driver() -> None:
            driver = NfqueueDriver(None, queue, lambda p, now: Verdict.PASS, counters=counters)
            await driver.start()
            print("ready", flush=True)
            await asyncio.Event().wait()

        uvloop.run(run_driver())


def _ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _run_once(ns: str, consumer: str | None, seconds: float) -> dict[str, float]:
    server = subprocess.Popen(
        _ns(ns, "iperf3", "-s", "-1", "-p", str(PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc = None
    try:
        if consumer is not None:
            subprocess.run(
                _ns(
                    ns,
                    "iptables",
                    "-A",
                    "INPUT",
                    "-p",
                    "udp",
                    "--dport",
                    str(PORT),
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    str(QUEUE),
                ),
                check=True,
            )
            proc = subprocess.Popen(
                _ns(ns, sys.executable, __file__, "consume", consumer, str(QUEUE)),
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": "src"},
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"consumer {consumer} did not start")
        time.sleep(0.3)
        out = subprocess.run(
            _ns(
                ns,
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(PORT),
                "-u",
                "-l",
                "64",
                "-b",
                "0",
                "-t",
                str(seconds),
                "--json",
            ),
            capture_output=True,
            text=True,
            timeout=seconds + 20,
        )
        result = json.loads(out.stdout)
        total = result["end"]["sum"]
        sent = total["packets"]
        lost = total["lost_packets"]
        duration = total["seconds"]
        row = {"offered": sent / duration, "received": (sent - lost) / duration}
    finally:
        seen = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                tail, _ = proc.communicate(timeout=5)
                seen = json.loads(tail.strip().splitlines()[-1])["count"]
            except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
                proc.kill()
                proc.wait()
            subprocess.run(_ns(ns, "iptables", "-F", "INPUT"), check=False)
        server.kill()
        server.wait()
    # What the consumer verdicted must agree with what the server counted.
    row["verdicts"] = -1.0 if seen is None and consumer else float(seen or 0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--consumers",
        default="netfilterqueue-asyncio,netfilterqueue-blocking,fnfqueue",
    )
    args = parser.parse_args()
    ns = f"vmbox-nfqb-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(_ns(ns, "ip", "link", "set", "lo", "up"), check=True)
        rows: dict[str, list[dict[str, float]]] = {}
        names: list[str | None] = [None, *args.consumers.split(",")]
        for _ in range(args.repeat):
            for name in names:
                rows.setdefault(name or "no queue rule", []).append(
                    _run_once(ns, name, args.seconds)
                )
        base = statistics.median(r["received"] for r in rows["no queue rule"])
        print(f"{'path':26} {'offered pkt/s':>14} {'received pkt/s':>15} {'ratio':>6}  runs")
        for name, runs in rows.items():
            offered = statistics.median(r["offered"] for r in runs)
            received = statistics.median(r["received"] for r in runs)
            each = " ".join(f"{r['received']:.0f}/{r['verdicts']:.0f}" for r in runs)
            print(f"{name:26} {offered:14.0f} {received:15.0f} {received / base:6.2f}  {each}")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        _consume(sys.argv[2], int(sys.argv[3]))
    else:
        main()
