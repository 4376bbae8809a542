"""Starting and supervising the ``corecast`` binary from Python.

:class:`Server` runs the binary as a child process: it writes the effective config to a
private temporary directory, creates a Unix datagram socket there and names it in
``NOTIFY_SOCKET``, and waits for corecast's systemd-style ``READY=1`` datagram, whose
``STATUS=listening on <addr> ...`` gives the bound address (port 0 included). No sleep,
no log scraping: a start-up failure is seen as the child's exit, and its stderr then holds
corecast's sentence, which becomes the exception's message.

Invariants:

- No corecast outlives its Python process. The child asks the kernel for SIGKILL when
  its parent dies (``PR_SET_PDEATHSIG``, set between fork and exec) and then checks that
  the parent did not die before that request. The kernel ties the request to the thread
  that forked, not the process, so children are forked by the main thread or by one
  long-lived daemon thread, never by a short-lived caller thread. A normal interpreter
  exit drains every server still running (``atexit``) before that.
- The child runs in its own process group, so a Ctrl-C on the terminal reaches Python
  only; :func:`run` forwards exactly one signal per signal received. Two signals reaching
  corecast at once would skip the drain.
- corecast's stderr (its log) is read by a thread at all times, so the child never blocks
  on a full pipe; each line is forwarded to the chosen sink and the last ones are kept
  for error messages.
"""

import atexit
import collections
import concurrent.futures
import ctypes
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, List, Mapping, Optional, Tuple

from ._binary import binary_path
from ._config import PathLike, dump_config, effective_config
from ._errors import ConfigError, CorecastError

#: sysexits.h EX_CONFIG, corecast's exit status for a refused configuration.
EX_CONFIG = 78

#: How long :meth:`Server.stop` waits for the drain before killing (corecast bounds its
#: own drain by ``shutdown_grace_ms``, 5 s by default).
STOP_TIMEOUT_SECS = 30.0

#: Lines of corecast's stderr kept for error messages and :attr:`Server.log`.
LOG_LINES_KEPT = 200

_READY_STATUS = re.compile(r"listening on (\S+)")
_CONFIG_ERROR_PREFIX = "corecast: config error: "
_ERROR_PREFIX = "corecast: error: "

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Optional[Callable[..., int]]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once in the parent: the forked child must not import or load anything.
_prctl = _load_prctl()


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """The code run in the child between fork and exec."""

    def setup() -> None:
        os.setpgid(0, 0)
        if _prctl is None or _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died before the request above: then nobody will signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


class _Spawner:
    """One daemon thread that forks children for threads that may end before them."""

    _lock = threading.Lock()
    _queue: "Optional[queue.SimpleQueue[Any]]" = None
    _owner_pid = 0

    @classmethod
    def call(cls, fn: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        with cls._lock:
            # After a fork the thread is gone: the child process gets its own.
            if cls._queue is None or cls._owner_pid != os.getpid():
                cls._queue = queue.SimpleQueue()
                cls._owner_pid = os.getpid()
                threading.Thread(target=cls._loop, args=(cls._queue,), name="corecast-spawner", daemon=True).start()
            jobs = cls._queue
        done: "concurrent.futures.Future[subprocess.Popen]" = concurrent.futures.Future()
        jobs.put((fn, done))
        return done.result()

    @staticmethod
    def _loop(jobs: "queue.SimpleQueue[Any]") -> None:
        while True:
            fn, done = jobs.get()
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller, which re-raises it
                done.set_exception(e)


def _spawn(argv: List[str], env: Mapping[str, str]) -> subprocess.Popen:
    parent = os.getpid()

    def popen() -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(parent),
        )

    if threading.current_thread() is threading.main_thread():
        return popen()
    return _Spawner.call(popen)


class _LogPump:
    """Reads the child's output until EOF: forwards each line, keeps the last ones."""

    def __init__(self, stream: Any, sink: Any):
        self._stream = stream
        self._sink = sink
        self._lines: Deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="corecast-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self._lines.append(line)
            self._forward(line)
        self._stream.close()

    def _forward(self, line: str) -> None:
        sink = sys.stderr if self._sink is None else self._sink
        if sink is None or sink == subprocess.DEVNULL:
            return
        try:
            sink.write(line + "\n")
            sink.flush()
        except Exception:
            # A closed or broken sink must not stop the draining, or corecast would block.
            pass

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def lines(self) -> List[str]:
        with self._lock:
            return list(self._lines)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _failure(returncode: int, lines: List[str], when: str) -> CorecastError:
    """The exception for a corecast that exited: its own sentence when it printed one."""
    for line in reversed(lines):
        if line.startswith(_CONFIG_ERROR_PREFIX):
            return ConfigError(line[len(_CONFIG_ERROR_PREFIX) :], returncode, lines)
    for line in reversed(lines):
        if line.startswith(_ERROR_PREFIX):
            return CorecastError(line[len(_ERROR_PREFIX) :], returncode, lines)
    last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    message = f"corecast {_describe_exit(returncode)} {when}" + (f": {last}" if last else "")
    if returncode == EX_CONFIG:
        return ConfigError(message, returncode, lines)
    return CorecastError(message, returncode, lines)


def _parse_addr(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


_running: "set[Server]" = set()
_running_lock = threading.Lock()


@atexit.register
def _drain_at_exit() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


class Server:
    """One corecast process: start it, learn its address, stop it.

    Arguments are those of :func:`run`, plus:

    - ``stderr``: where corecast's log lines go: ``None`` (Python's ``sys.stderr``),
      any object with ``write``, or ``subprocess.DEVNULL``.
    - ``start_timeout``: seconds to wait for corecast to listen.

    As a context manager it starts on entry and stops (draining) on exit::

        with corecast.Server(port=0, config_dict=cfg) as server:
            host, port = server.address
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8888,
        *,
        config_path: Optional[PathLike] = None,
        config_dict: Optional[Mapping[str, Any]] = None,
        name: Optional[str] = None,
        stderr: Any = None,
        start_timeout: float = 60.0,
    ):
        self._host = host
        self._port = port
        self._config_path = config_path
        self._config_dict = config_dict
        self._name = name
        self._sink = stderr
        self._start_timeout = start_timeout
        self._proc: Optional[subprocess.Popen] = None
        self._pump: Optional[_LogPump] = None
        self._notify: Optional[socket.socket] = None
        self._tmpdir: Optional[str] = None
        self._owner_pid = os.getpid()
        self._address: Optional[Tuple[str, int]] = None
        self._reap_lock = threading.Lock()
        self._reaped = False

    # -- state ---------------------------------------------------------------------

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """``(host, port)`` corecast listens on, once :meth:`start` has returned."""
        return self._address

    @property
    def host(self) -> Optional[str]:
        return self._address[0] if self._address else None

    @property
    def port(self) -> Optional[int]:
        return self._address[1] if self._address else None

    @property
    def pid(self) -> Optional[int]:
        """The corecast process id, once started."""
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once corecast has exited (negative: killed by that signal)."""
        return self._proc.poll() if self._proc else None

    @property
    def log(self) -> List[str]:
        """The last lines corecast printed (its log), oldest first."""
        return self._pump.lines() if self._pump else []

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Tuple[str, int]:
        """Starts corecast and returns ``(host, port)`` once every shard accepts.

        Raises :class:`ConfigError` when corecast refuses the config and
        :class:`CorecastError` for any other start-up failure, with corecast's message.
        """
        if self._proc is not None:
            raise RuntimeError("this corecast server was already started")
        self._owner_pid = os.getpid()
        config, passthrough = effective_config(self._host, self._port, self._config_path, self._config_dict)
        text = None if config is None else dump_config(config)
        binary = binary_path()
        self._tmpdir = tempfile.mkdtemp(prefix="corecast-")
        try:
            if text is not None:
                config_file = Path(self._tmpdir, "config.json")
                config_file.write_text(text, encoding="utf-8")
            else:
                assert passthrough is not None  # effective_config returns one of the two
                config_file = passthrough
            notify_path = os.path.join(self._tmpdir, "notify.sock")
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind(notify_path)
            self._notify.setblocking(False)
            argv = [str(binary), "serve", "--config", str(config_file)]
            if self._name is not None:
                argv += ["--name", self._name]
            env = dict(os.environ)
            env["NOTIFY_SOCKET"] = notify_path
            with _running_lock:
                self._proc = _spawn(argv, env)
                _running.add(self)
            self._pump = _LogPump(self._proc.stdout, self._sink)
            self._address = self._wait_ready()
            return self._address
        except BaseException:
            self._abort()
            raise

    def _wait_ready(self) -> Tuple[str, int]:
        assert self._proc is not None and self._notify is not None
        deadline = time.monotonic() + self._start_timeout
        poller = select.poll()
        poller.register(self._notify, select.POLLIN)
        pidfd = -1
        try:
            pidfd = os.pidfd_open(self._proc.pid)  # wakes us when the child exits
            poller.register(pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pass  # no pidfd: the child's exit is noticed on the next short poll instead
        try:
            while True:
                while True:
                    try:
                        datagram = self._notify.recv(4096).decode("utf-8", "replace")
                    except BlockingIOError:
                        break
                    fields = dict(item.partition("=")[::2] for item in datagram.split("\n"))
                    if fields.get("READY") == "1":
                        found = _READY_STATUS.search(fields.get("STATUS", ""))
                        if found is None:
                            raise CorecastError(f"corecast reported readiness without its address: {datagram!r}")
                        return _parse_addr(found.group(1))
                if self._proc.poll() is not None:
                    raise self._exited_error("before listening")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CorecastError(
                        f"corecast did not report that it listens within {self._start_timeout:g} s",
                        None,
                        self.log,
                    )
                poller.poll(1000 * (left if pidfd >= 0 else min(left, 0.1)))
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _exited_error(self, when: str) -> CorecastError:
        assert self._proc is not None
        returncode = self._proc.wait()
        if self._pump is not None:
            self._pump.join(5.0)
        return _failure(returncode, self.log, when)

    def _abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap(None)

    def send_signal(self, signum: int) -> None:
        """Sends ``signum`` to corecast if it still runs (SIGINT/SIGTERM: drain)."""
        if self._proc is not None and self._owner_pid == os.getpid():
            # Popen.send_signal does nothing once the child has been reaped.
            self._proc.send_signal(signum)

    def kill(self) -> None:
        """Stops corecast at once (SIGKILL), without a drain."""
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for corecast to exit and returns its exit status.

        Raises ``subprocess.TimeoutExpired`` if it still runs after ``timeout`` seconds.
        """
        if self._proc is None:
            raise RuntimeError("this corecast server was never started")
        return self._reap(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_SECS) -> int:
        """Drains corecast (SIGTERM: every client gets the shutdown notice) and waits.

        Kills it if the drain has not finished after ``timeout`` seconds. Returns the
        exit status: 0 after a complete drain.
        """
        if self._proc is None:
            raise RuntimeError("this corecast server was never started")
        if self._owner_pid != os.getpid():
            return self._proc.returncode if self._proc.returncode is not None else 0
        self.send_signal(signal.SIGTERM)
        try:
            return self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self._reap(None)

    def _reap(self, timeout: Optional[float]) -> int:
        returncode = self._proc.wait(timeout) if self._proc is not None else -1
        with self._reap_lock:
            if not self._reaped:
                self._reaped = True
                if self._pump is not None:
                    self._pump.join(5.0)
                if self._notify is not None:
                    self._notify.close()
                if self._tmpdir is not None:
                    shutil.rmtree(self._tmpdir, ignore_errors=True)
                with _running_lock:
                    _running.discard(self)
        return returncode

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped" if self._proc else "not started"
        where = f" on {self._address[0]}:{self._address[1]}" if self._address else ""
        return f"<corecast.Server {state}{where} pid={self.pid}>"


class _ForwardSignals:
    """SIGINT/SIGTERM to Python become a drain of corecast; the second stops it at once.

    corecast itself treats a second signal during its drain as "exit now" (status 130),
    so each signal is forwarded once; a third, should corecast not have exited, kills it.
    Python allows signal handlers in the main thread only; elsewhere nothing is installed.
    """

    def __init__(self, server: Server):
        self._server = server
        self.received = 0
        self._forwarded = 0
        self._previous: dict = {}

    def __enter__(self) -> "_ForwardSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received += 1
        self.flush(signum)

    def flush(self, signum: int = signal.SIGTERM) -> None:
        """Forwards signals that arrived before corecast's process existed."""
        while self._forwarded < self.received and self._server.pid is not None:
            self._forwarded += 1
            self._server.send_signal(signum if self._forwarded <= 2 else signal.SIGKILL)


def run(
    host: str = "127.0.0.1",
    port: int = 8888,
    *,
    config_path: Optional[PathLike] = None,
    config_dict: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
) -> None:
    """Runs corecast in the foreground until SIGINT or SIGTERM has drained it.

    The same shape and precedence as ``SummonerServer.run`` with a Rust backend: the
    config (``config_dict``, else the JSON file at ``config_path``) supplies every
    setting, and its ``host`` and ``port`` win over the arguments, which apply when the
    config has none (or null). ``name`` tags the log lines and names the log file.

    The first SIGINT or SIGTERM drains corecast (every client gets
    ``Warning: Server is shutting down.``) and ``run`` returns once it has exited; a
    second one stops it at once. Raises :class:`ConfigError` or :class:`CorecastError`
    with corecast's message when it cannot start, and :class:`CorecastError` when it
    exits on its own with a failure.
    """
    server = Server(host, port, config_path=config_path, config_dict=config_dict, name=name)
    with _ForwardSignals(server) as signals:
        try:
            server.start()
        except CorecastError:
            if signals.received:
                return  # stopped on request while starting
            raise
        try:
            signals.flush()
            returncode = server.wait()
        finally:
            if server.is_running():  # an exception from elsewhere is unwinding run()
                server.stop()
    if returncode != 0 and not signals.received:
        raise _failure(returncode, server.log, "while serving")
