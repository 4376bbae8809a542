#!/usr/bin/env python3
"""Accept rate and relay CPU per connection with large allow/deny lists against none.

Each round starts the relay (release build) with one of two configs, then THREADS client
threads open loopback connections for SECONDS: connect, half-close, wait for the relay
to close, reset (SO_LINGER 0, so no TIME_WAIT piles up). Every connection is admitted, so
each one runs the whole accept path: with "lists", a lookup in a 10,000-entry `deny` list
(a miss) and in a 10,000-entry `allow` list (a hit). It reports connections per second
and the relay's CPU time (user + system, from /proc) per connection. Sides alternate
between rounds so that a drift in the machine's speed does not favour one.

    cargo build --release --bin corecast
    python3 loadgen/accept-rate.py [ROUNDS] [SECONDS] [THREADS]
"""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BINARY = os.path.join(TARGET, "release", "corecast")
ENTRIES = 10_000


def configs():
    # allow: 9,999 scattered /24s of 10.0.0.0/8 plus loopback; deny: 10,000 hosts of
    # 172.16.0.0/12. Neither merges into a few ranges.
    allow = [f"10.{(i * 2) // 256}.{(i * 2) % 256}.0/24" for i in range(ENTRIES - 1)] + ["127.0.0.0/8"]
    deny = [f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(0, ENTRIES * 3, 3)]
    quiet = {"logger": {"log_level": "WARNING"}, "hyper_parameters": {"rate_limit_msgs_per_minute": None}}
    with_lists = json.loads(json.dumps(quiet))
    with_lists["hyper_parameters"].update({"allow": allow, "deny": deny})
    return {"none": quiet, "lists": with_lists}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port, stop, counts, index):
    n = 0
    linger = struct.pack("ii", 1, 0)
    while not stop.is_set():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect(("127.0.0.1", port))
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    counts[index] = n


def round_trip(name, config, seconds, threads):
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
        path = f.name
    relay = subprocess.Popen([BINARY, "--config", path, "--port", str(port), "--shards", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("the relay did not start")
                time.sleep(0.05)
        time.sleep(0.2)
        stop = threading.Event()
        counts = [0] * threads
        workers = [threading.Thread(target=client, args=(port, stop, counts, i)) for i in range(threads)]
        cpu0, t0 = cpu_seconds(relay.pid), time.time()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        cpu, wall = cpu_seconds(relay.pid) - cpu0, time.time() - t0
        total = sum(counts)
        print(f"{name:5} {total / wall:9.0f} conn/s  {cpu * 1e6 / max(total, 1):6.1f} us relay CPU/conn  ({total} in {wall:.1f} s)",
              flush=True)
        return total / wall, cpu * 1e6 / max(total, 1)
    finally:
        relay.kill()
        relay.wait()
        os.unlink(path)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    sides = configs()
    results = {"none": [], "lists": []}
    for r in range(rounds):
        order = ["none", "lists"] if r % 2 == 0 else ["lists", "none"]
        for name in order:
            results[name].append(round_trip(name, sides[name], seconds, threads))
    for name, rows in results.items():
        rates = sorted(r for r, _ in rows)
        cpus = sorted(c for _, c in rows)
        print(f"median {name:5} {rates[len(rates) // 2]:9.0f} conn/s  {cpus[len(cpus) // 2]:6.1f} us relay CPU/conn")


if __name__ == "__main__":
    main()
