#!/usr/bin/env python3
"""Memory with many consumers that stop reading.

Starts a release corecast on a free loopback port, connects N consumers that never read
(default socket buffers), one healthy reader and one sender that sends 200-byte lines at
a steady rate, then samples the relay's resident memory every 100 ms until every stuck
consumer has been closed (or a time limit). Prints one result line: peak RSS, how long
the stuck consumers took to be closed, and the longest gap the healthy reader saw.

    loadgen/stuck-consumers-rss.py [--consumers 1000] [--rate 20000] [--seconds 20]
                                   [--config-json '{"hyper_parameters":{...}}']
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--consumers", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=20000, help="lines per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--shards", default="2")
    ap.add_argument("--config-json", default="{}")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/corecast"))
    a = ap.parse_args()

    cfg = json.loads(a.config_json)
    hp = cfg.setdefault("hyper_parameters", {})
    hp.setdefault("rate_limit_msgs_per_minute", None)
    hp.setdefault("client_timeout_secs", None)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
        path = f.name
    relay = subprocess.Popen(
        [a.binary, "--port", "0", "--shards", a.shards, "--config", path, "--log-level", "warn"],
        stderr=subprocess.PIPE,
        text=True,
    )
    # The address comes from the readiness line, which WARN level does not print; ask
    # the kernel instead: the relay's listening socket is the only one it has.
    port = None
    deadline = time.time() + 10
    while port is None and time.time() < deadline:
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"pid={relay.pid}," in line:
                port = int(line.split()[3].rsplit(":", 1)[1])
                break
        time.sleep(0.05)
    if port is None:
        relay.kill()
        sys.exit("the relay did not listen")
    closes = []
    threading.Thread(target=lambda: [closes.append(l) for l in relay.stderr if "slow consumer" in l], daemon=True).start()

    addr = ("127.0.0.1", port)
    stuck = [socket.create_connection(addr) for _ in range(a.consumers)]
    healthy = socket.create_connection(addr)
    sender = socket.create_connection(addr)
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    time.sleep(0.5)
    stop = threading.Event()
    gap = [0.0]

    def read_healthy():
        last = None
        healthy.settimeout(1.0)
        while not stop.is_set():
            try:
                if not healthy.recv(1 << 16):
                    return
            except socket.timeout:
                continue
            now = time.monotonic()
            if last is not None:
                gap[0] = max(gap[0], now - last)
            last = now

    def send():
        line = b"x" * 199 + b"\n"
        per_tick = max(1, a.rate // 100)
        start = time.monotonic()
        tick = 0
        while not stop.is_set():
            due = start + tick * 0.01
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sender.sendall(line * per_tick)
            tick += 1

    threading.Thread(target=read_healthy, daemon=True).start()
    threading.Thread(target=send, daemon=True).start()
    start = time.monotonic()
    peak = 0
    all_closed_at = None
    while time.monotonic() - start < a.seconds:
        peak = max(peak, rss_kib(relay.pid))
        if all_closed_at is None and len(closes) >= a.consumers:
            all_closed_at = time.monotonic() - start
        time.sleep(0.1)
    stop.set()
    relay.terminate()
    relay.wait(timeout=15)
    os.unlink(path)
    closed = f"{all_closed_at:.1f} s" if all_closed_at is not None else f"only {len(closes)} closed"
    print(
        f"consumers={a.consumers} rate={a.rate}/s config={a.config_json} peak_rss={peak / 1024:.0f} MiB "
        f"stuck_closed_after={closed} healthy_longest_gap={gap[0]:.2f} s"
    )


if __name__ == "__main__":
    main()
