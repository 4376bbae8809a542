"""Signals and process lifetime: corecast.run drains on SIGINT/SIGTERM, a second signal
stops it at once, and no corecast outlives a killed Python parent."""

import ctypes
import os
import signal
import textwrap
import threading
import time

from helpers import (
    PATIENCE,
    SHUTDOWN_NOTICE,
    Client,
    Script,
    children_of,
    one_shard,
    wait_for_line,
    wait_registered,
    wait_until,
)


def run_script(config, name="pyrun", own_group=False):
    return Script(
        textwrap.dedent(
            f"""
            import corecast
            corecast.run("127.0.0.1", 0, config_dict={config!r}, name={name!r})
            print("run returned", flush=True)
            """
        ),
        own_group=own_group,
    )


def test_sigint_to_run_drains_every_client_and_exits_0():
    script = run_script(one_shard())
    try:
        address = script.listening_address()
        a, b = Client(address), Client(address)
        wait_registered(script.stderr, a, b)
        a.send(b"before the end\n")
        assert b.read_line() == b'{"content":"before the end","remote_addr":"%s"}\n' % a.addr.encode()
        script.proc.send_signal(signal.SIGINT)
        assert a.read_to_eof() == SHUTDOWN_NOTICE
        assert b.read_to_eof() == SHUTDOWN_NOTICE
        assert script.wait() == 0
    finally:
        script.kill()
    assert script.stdout() == ["run returned"]
    assert any(" - pyrun - INFO - SIGINT received; draining" in line for line in script.stderr())
    assert any("all shards drained; exiting" in line for line in script.stderr())


def test_ctrl_c_on_a_terminal_drains_once_although_it_signals_the_whole_group():
    # A terminal sends SIGINT to its foreground process group. corecast runs in a group of
    # its own, so it hears the signal once, from Python, and drains instead of stopping.
    script = run_script(one_shard(), own_group=True)
    try:
        address = script.listening_address()
        client = Client(address)
        wait_registered(script.stderr, client)
        (relay,) = children_of(script.proc.pid)
        assert os.getpgid(relay) == relay != os.getpgid(script.proc.pid)
        os.killpg(script.proc.pid, signal.SIGINT)
        assert client.read_to_eof() == SHUTDOWN_NOTICE
        assert script.wait() == 0
    finally:
        script.kill()
    assert script.stdout() == ["run returned"]
    assert not any("second signal" in line for line in script.stderr())


def test_a_second_signal_stops_corecast_at_once():
    # A client that never reads keeps the drain waiting until the (long) grace ends.
    config = one_shard(
        rate_limit_msgs_per_minute=None,
        shutdown_grace_ms=120_000,
        max_pending_bytes=32 << 20,
        backpressure_policy={"enable_disconnect": False},
    )
    script = run_script(config)
    try:
        address = script.listening_address()
        stuck, sender = Client(address, rcvbuf=4096), Client(address)
        wait_registered(script.stderr, stuck, sender)
        line = b"x" * 65535 + b"\n"
        # 12 MB: more than the kernel buffers toward the stuck client hold (4 MB here).
        pushing = threading.Thread(target=lambda: _send_quietly(sender, line * 192), daemon=True)
        pushing.start()
        time.sleep(2.0)  # lets the relay fill those buffers; nothing is asserted on timing
        script.proc.send_signal(signal.SIGTERM)
        wait_for_line(script.stderr, "SIGTERM received; draining")
        time.sleep(1.0)
        assert script.proc.poll() is None, "the drain ended early:\n" + "\n".join(script.stderr())
        script.proc.send_signal(signal.SIGINT)
        # Far sooner than the 120 s grace.
        assert script.wait(PATIENCE) == 0
    finally:
        script.kill()
    assert script.stdout() == ["run returned"]
    assert any("second signal (SIGINT) during the drain; exiting now" in line for line in script.stderr())
    stuck.close()
    sender.close()


def _send_quietly(client, data):
    try:
        client.send(data)
    except OSError:
        pass  # the relay went away mid-send, which this test causes


PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def test_sigkill_of_the_python_parent_leaves_no_corecast_process():
    # As a subreaper this test inherits the orphan, so it can reap it and see how it died.
    _set_subreaper(True)
    try:
        script = Script(
            textwrap.dedent(
                f"""
                import time, corecast
                server = corecast.Server(port=0, config_dict={one_shard()!r})
                server.start()
                print(server.pid, flush=True)
                time.sleep(600)
                """
            )
        )
        wait_until(lambda: script.stdout(), "the script to print corecast's pid")
        pid = int(script.stdout()[0])
        assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "corecast"
        script.proc.send_signal(signal.SIGKILL)
        assert script.wait() == -signal.SIGKILL
        status = []

        def reaped() -> bool:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(raw)
            return bool(done)

        try:
            wait_until(reaped, f"corecast (pid {pid}) to die with its parent")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        assert os.WIFSIGNALED(status[0]) and os.WTERMSIG(status[0]) == signal.SIGKILL
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        _set_subreaper(False)
