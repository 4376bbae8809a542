#!/usr/bin/env python3
"""Large lines to many readers (issue 21): one client sends N lines of SIZE bytes as fast as
it can to R readers that read as fast as they can; each reader checks every byte as it
arrives. Prints how many readers got everything byte for byte and in order, the time, and
the relay's peak RSS (sampled every 50 ms from /proc/PID/status).

usage: large-lines.py PORT READERS LINES SIZE RELAY_PID
"""
import socket, sys, threading, time, os, subprocess, json
port = int(sys.argv[1]); R = int(sys.argv[2]); N = int(sys.argv[3]); SIZE = int(sys.argv[4])
pid = int(sys.argv[5]) if len(sys.argv) > 5 else None
readers = []
for i in range(R):
    s = socket.create_connection(("127.0.0.1", port)); readers.append(s)
time.sleep(0.5)
snd = socket.create_connection(("127.0.0.1", port))
src = "%s:%d" % snd.getsockname()
lines = [(("%06d" % i) + "x" * (SIZE - 6)) for i in range(N)]
want = b"".join(b'{"content":"' + l.encode() + b'","remote_addr":"' + src.encode() + b'"}\n' for l in lines)
res = [None] * R
def rd(i):
    s = readers[i]; n = 0; ok = True; s.settimeout(60); buf = bytearray(1 << 20)
    try:
        while n < len(want):
            k = s.recv_into(buf)
            if not k: break
            if buf[:k] != want[n:n + k]: ok = False
            n += k
    except Exception as e:
        pass
    res[i] = ok and n == len(want)
ts = [threading.Thread(target=rd, args=(i,)) for i in range(R)]
for t in ts: t.start()
peak = [0]
def rss():
    while any(t.is_alive() for t in ts):
        if pid:
            for l in open("/proc/%d/status" % pid):
                if l.startswith("VmRSS"): peak[0] = max(peak[0], int(l.split()[1]))
        time.sleep(0.05)
mt = threading.Thread(target=rss); mt.start()
t0 = time.time()
payload = b"".join(l.encode() + b"\n" for l in lines)
snd.sendall(payload)
for t in ts: t.join()
mt.join()
ok = sum(1 for r in res if r)
print("readers complete and byte-exact: %d of %d; %.2f s; peak relay RSS %d KiB" % (ok, R, time.time() - t0, peak[0]))
