"""corecast.Server over real sockets: readiness, the wire, errors, stopping."""

import json
import socket
import subprocess
import textwrap
import threading

import pytest

import corecast
from helpers import SHUTDOWN_NOTICE, Client, Script, free_port, one_shard, wait_for_line, wait_registered


def test_two_raw_sockets_talk_through_a_server_byte_exact():
    with corecast.Server(port=0, config_dict=one_shard()) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        a, b = Client(server.address), Client(server.address)
        wait_registered(lambda: server.log, a, b)
        a.send(b"hi\n")
        assert b.read_line() == b'{"content":"hi","remote_addr":"%s"}\n' % a.addr.encode()
        b.send(b'say "\x1b"\r\n')
        assert a.read_line() == b'{"content":"say \\"\\u001b\\"","remote_addr":"%s"}\n' % b.addr.encode()
        a.close()
        b.close()


def test_leaving_the_with_block_drains_every_client_and_exits_0():
    with corecast.Server(port=0, config_dict=one_shard()) as server:
        clients = [Client(server.address) for _ in range(3)]
        wait_registered(lambda: server.log, *clients)
    assert server.returncode == 0
    assert not server.is_running()
    for client in clients:
        assert client.read_to_eof() == SHUTDOWN_NOTICE
        client.close()


def test_a_config_error_raises_config_error_with_the_json_path(tmp_path):
    with pytest.raises(corecast.ConfigError) as caught:
        corecast.Server(port=0, config_dict={"hyper_parameters": {"rate_limit_msgs_per_minute": "fast"}}).start()
    assert str(caught.value) == 'hyper_parameters.rate_limit_msgs_per_minute: expected an integer, found "fast"'
    assert caught.value.returncode == 78

    path = tmp_path / "server_config.json"
    path.write_text(json.dumps({"version": "corecast", "logger": {"log_level": "LOUD"}}))
    with pytest.raises(corecast.ConfigError, match=r"^logger\.log_level: expected one of TRACE"):
        corecast.Server(port=0, config_path=path).start()


def test_an_unreadable_config_file_is_corecasts_own_config_error(tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(corecast.ConfigError) as caught:
        corecast.Server(config_path=missing).start()
    assert str(caught.value).startswith(f"cannot read config file {missing}: ")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(corecast.ConfigError, match=f"^config file {broken} is not valid JSON: "):
        corecast.Server(config_path=broken).start()


def test_a_busy_port_raises_corecasts_sentence_and_not_a_config_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(corecast.CorecastError) as caught:
            corecast.Server(port=port, config_dict=one_shard()).start()
    assert not isinstance(caught.value, corecast.ConfigError)
    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{port}: address already in use (is another relay running?)"
    )
    assert caught.value.returncode == 1


def test_the_configs_host_and_port_win_over_the_arguments():
    port = free_port()
    config = {**one_shard(), "host": "127.0.0.1", "port": port}
    with corecast.Server("localhost", 1, config_dict=config) as server:
        assert server.address == ("127.0.0.1", port)
    # null (as in Summoner's templates) falls back to the argument.
    config = {**one_shard(), "host": None, "port": None}
    with corecast.Server("127.0.0.1", 0, config_dict=config) as server:
        assert server.port not in (None, 0, 8888)


def test_a_server_started_from_a_short_lived_thread_outlives_that_thread():
    # The kernel's parent-death signal follows the forking thread, not the process.
    started = []
    thread = threading.Thread(target=lambda: started.append(corecast.Server(port=0, config_dict=one_shard())))
    thread.start()
    thread.join()
    server = started[0]
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    try:
        assert server.is_running()
        a, b = Client(server.address), Client(server.address)
        wait_registered(lambda: server.log, a, b)
        a.send(b"still here\n")
        assert b.read_line().startswith(b'{"content":"still here"')
        a.close()
        b.close()
    finally:
        assert server.stop() == 0


def test_unknown_keys_are_warned_about_in_the_forwarded_log():
    config = one_shard(rate_limit_msg_per_minute=5)
    with corecast.Server(port=0, config_dict=config, stderr=subprocess.DEVNULL) as server:
        line = wait_for_line(lambda: server.log, "unknown config key")
    assert "did you mean hyper_parameters.rate_limit_msgs_per_minute" in line


def test_the_binarys_start_up_checks_surface_with_their_sentence():
    # The locked-memory check, as the command line runs it, in a process with a tiny limit.
    script = Script(
        textwrap.dedent(
            f"""
            import resource, corecast
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
            try:
                corecast.Server(port=0, config_dict={one_shard()!r}).start()
            except corecast.ConfigError:
                print("wrongly a ConfigError", flush=True)
            except corecast.CorecastError as e:
                print(e, flush=True)
            """
        )
    )
    assert script.wait() == 0
    (message,) = script.stdout()
    assert message.startswith("locked-memory limit (RLIMIT_MEMLOCK) is 64 KiB but corecast needs at least "), message
