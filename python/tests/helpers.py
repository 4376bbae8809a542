"""Shared pieces of the Python tests: real sockets to a real corecast, bounded waits.

Every wait has a generous deadline so that a broken package fails a test instead of
hanging it; no test asserts on timing beyond such bounds.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
STANDIN_SDK = Path(__file__).resolve().parent / "standin_sdk"

#: Deadline for anything corecast should do promptly.
PATIENCE = 20.0

#: The shutdown notice (N3), as every client receives it.
SHUTDOWN_NOTICE = b"Warning: Server is shutting down.\n"


def cargo_version() -> str:
    text = (REPO / "Cargo.toml").read_text(encoding="utf-8")
    found = re.search(r'(?m)^version = "([^"]+)"', text)
    assert found, "Cargo.toml has no package version"
    return found.group(1)


def one_shard(**hyper) -> Dict:
    """A small config: one shard, so tests leave the second core to the machine."""
    return {"logger": {"log_level": "INFO"}, "hyper_parameters": {"worker_threads": 1, **hyper}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_for_line(lines: Callable[[], List[str]], needle: str, timeout: float = PATIENCE) -> str:
    found: List[str] = []

    def seen() -> bool:
        found[:] = [line for line in lines() if needle in line]
        return bool(found)

    try:
        wait_until(seen, repr(needle), timeout)
    except AssertionError:
        raise AssertionError(f"never saw {needle!r}; lines:\n" + "\n".join(lines())) from None
    return found[0]


class Client:
    """One raw TCP client, as `nc` would be."""

    def __init__(self, address, rcvbuf: Optional[int] = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(PATIENCE)
        self.sock.connect(address)
        self.reader = self.sock.makefile("rb")

    @property
    def addr(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        return self.reader.readline()

    def read_to_eof(self) -> bytes:
        return self.reader.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def children_of(pid: int) -> List[int]:
    """Process ids whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name (field 2) is in parentheses and may hold spaces.
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_registered(log: Callable[[], List[str]], *clients: Client) -> None:
    """Waits until corecast has logged each client's connection (so it gets broadcasts)."""
    for client in clients:
        wait_for_line(log, f"client connected: {client.addr}")


class Script:
    """A Python script run with this environment's interpreter; its output is collected."""

    def __init__(
        self,
        code: str,
        extra_path: Optional[Path] = None,
        own_group: bool = False,
        env: Optional[Dict[str, str]] = None,
    ):
        env = {**os.environ, **(env or {})}
        if extra_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=own_group,
        )
        self._stdout: List[str] = []
        self._stderr: List[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream, into: List[str]) -> None:
        for raw in stream:
            into.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def stdout(self) -> List[str]:
        return list(self._stdout)

    def stderr(self) -> List[str]:
        return list(self._stderr)

    def listening_address(self):
        """The address from corecast's forwarded `listening on <addr>` log line."""
        line = wait_for_line(self.stderr, "listening on ")
        found = re.search(r"listening on (\S+):(\d+) ", line)
        assert found, line
        return found.group(1), int(found.group(2))

    def wait(self, timeout: float = PATIENCE) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("script did not exit; stderr:\n" + "\n".join(self.stderr())) from None
        for reader in self._readers:
            reader.join(PATIENCE)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
