#!/usr/bin/env python3
"""Partial lines and memory (issue 21): N connections each try to send 1 MiB of a line
without its newline (non-blocking, until no connection makes progress for 10 s), then the
relay's RSS is read from /proc/PID/status, and a short line is sent through a fresh pair of
connections to show that complete lines still flow. Needs an open-file limit above N on
both sides.

usage: partial-lines-rss.py PORT RELAY_PID N
"""
import socket, sys, time, errno
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss():
    for l in open("/proc/%d/status" % pid):
        if l.startswith("VmRSS"): return int(l.split()[1])
base = rss()
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False); socks.append(s)
time.sleep(1)
print("connected %d; relay RSS %d KiB (before any partial line: %d KiB)" % (n, rss(), base), flush=True)
chunk = b"p" * (64 << 10)
left = [1 << 20] * n
t0 = time.time(); last_progress = time.time(); sent = 0
while time.time() - last_progress < 10 and time.time() - t0 < 120:
    progress = False
    for i, s in enumerate(socks):
        while left[i]:
            try:
                k = s.send(chunk[:min(len(chunk), left[i])])
            except BlockingIOError:
                break
            left[i] -= k; sent += k; progress = True
    if progress: last_progress = time.time()
    time.sleep(0.05)
peak = rss()
done = sum(1 for x in left if x == 0)
print("clients pushed %d MiB in total (%d of %d connections sent their whole 1 MiB into the kernel); relay RSS %d KiB" % (sent >> 20, done, n, peak), flush=True)
# Short lines still flow.
r = socket.create_connection(("127.0.0.1", port)); t = socket.create_connection(("127.0.0.1", port))
time.sleep(0.5); t.sendall(b"short line\n"); r.settimeout(10)
print("a short line relayed meanwhile:", r.recv(200)[:40], flush=True)
for s in socks: s.close()
