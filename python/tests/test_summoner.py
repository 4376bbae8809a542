"""The Summoner backend: an unchanged server script plus `"version": "corecast"`.

The SDK is not on PyPI, so these tests run against `standin_sdk/`, which reproduces the
SDK's backend resolution (`RUST_MODULES` filled at import, `rust` prefixes refused when
unresolved, every other version falling to its Python relay, the flattened payload,
host/port precedence). The wheel's `corecast.pth` registers corecast when the SDK is
imported: no script here imports corecast before calling the SDK.
"""

import json
import signal
import subprocess
import sys
import textwrap
import venv

import corecast
from helpers import (
    PATIENCE,
    SHUTDOWN_NOTICE,
    STANDIN_SDK,
    Client,
    Script,
    free_port,
    wait_registered,
)

# Non-default values for every key corecast reads, so that a key lost on the way shows.
LOGGER = {
    "log_level": "DEBUG",
    "enable_console_log": False,
    "enable_file_log": True,
    "log_file_path": "logs/",
    "enable_json_log": True,
    "date_format": "%H:%M:%S",
    "log_keys": ["from", "to"],
    "max_file_size": 1000,
    "backup_count": 2,
    # Python-only keys of the SDK's logger: accepted, no effect.
    "console_log_format": "%(message)s",
    "log_format": "%(message)s",
}
HYPER = {
    "client_timeout_secs": 120,
    "timeout_check_interval_secs": 7,
    "rate_limit_msgs_per_minute": 600,
    "accept_error_backoff_ms": 50,
    "quarantine_cooldown_secs": 60,
    "quarantine_cleanup_interval_secs": 30,
    "throttle_delay_ms": 100,
    "flow_control_delay_ms": 500,
    "worker_threads": 1,
    "backpressure_policy": {
        "enable_throttle": False,
        "throttle_threshold": 50,
        "enable_flow_control": False,
        "flow_control_threshold": 150,
        "enable_disconnect": False,
        "disconnect_threshold": 250,
    },
    # corecast's extensions.
    "max_line_bytes": 4096,
    "max_pending_bytes": 4 << 20,
    "max_connections": 1000,
    "quarantine_by": "addr",
    "quarantine_max_entries": 500,
    "quarantine_strikes": 2,
    "write_deadline_ms": 7000,
    "shutdown_grace_ms": 2500,
    "flush_window_us": 1000,
    "admin_addr": "127.0.0.1:9100",
    "cluster": {"nats": ["nats://127.0.0.1:4222"], "subject": "corecast"},
    # The reference's channel sizes: accepted, no effect.
    "connection_buffer_size": 256,
    "command_buffer_size": 64,
    "control_channel_capacity": 16,
    "queue_monitor_capacity": 50,
}
#: Keys corecast accepts without applying them, so `corecast check` does not show them.
INERT_LOGGER = {"console_log_format", "log_format"}
INERT_HYPER = {"connection_buffer_size", "command_buffer_size", "control_channel_capacity", "queue_monitor_capacity"}


def test_the_payload_becomes_a_complete_config_with_every_key_in_place():
    payload = {"host": "0.0.0.0", "port": 9001, "logger": LOGGER, **HYPER}
    config = corecast.config_from_payload(payload)
    assert config == {
        "version": "corecast",
        "host": "0.0.0.0",
        "port": 9001,
        "logger": LOGGER,
        "hyper_parameters": HYPER,
    }
    config["hyper_parameters"]["backpressure_policy"]["enable_throttle"] = True
    assert payload["backpressure_policy"]["enable_throttle"] is False, "the payload was modified"


def test_every_payload_key_reaches_the_binary(tmp_path):
    config = corecast.config_from_payload({"host": "0.0.0.0", "port": 9001, "logger": LOGGER, **HYPER})
    path = tmp_path / "server_config.json"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [str(corecast.binary_path()), "check", "--config", str(path)], capture_output=True, timeout=PATIENCE
    )
    assert out.returncode == 0, out.stderr.decode()
    effective = json.loads(out.stdout)
    warnings = out.stderr.decode()
    assert (effective["host"], effective["port"]) == ("0.0.0.0", 9001)
    # Each key is applied (and `check` shows our value), accepted as inert, or, for a key
    # this build does not know yet, warned about by name: never dropped in silence.
    for section, sent, inert in (("logger", LOGGER, INERT_LOGGER), ("hyper_parameters", HYPER, INERT_HYPER)):
        for key, value in sent.items():
            shown = effective[section].get(key)
            if key in effective[section]:
                assert shown == value, f"{section}.{key}: sent {value!r}, corecast has {shown!r}"
            elif key not in inert:
                assert f"unknown config key {section}.{key} ignored" in warnings, f"{section}.{key} was lost"
        for key in inert:
            assert f"{section}.{key}" not in warnings


def test_an_unchanged_summoner_server_runs_corecast_and_drains_on_sigint(tmp_path):
    port = free_port()
    path = tmp_path / "server_config.json"
    path.write_text(
        json.dumps(
            {
                "version": "corecast",
                "host": "127.0.0.1",
                "port": port,
                "logger": {"log_level": "INFO", "enable_file_log": False},
                "hyper_parameters": {"worker_threads": 1, "rate_limit_msgs_per_minute": 300},
            }
        )
    )
    # summoner-agents' server.py, as it is, but for the host and port arguments.
    script = Script(
        textwrap.dedent(
            f"""
            from summoner.server import SummonerServer
            SummonerServer(name="hooked").run(host="10.9.9.9", port=1, config_path={str(path)!r})
            print("run returned", flush=True)
            """
        ),
        extra_path=STANDIN_SDK,
    )
    try:
        # The config's host and port won over run()'s arguments.
        assert script.listening_address() == ("127.0.0.1", port)
        a, b = Client(("127.0.0.1", port)), Client(("127.0.0.1", port))
        wait_registered(script.stderr, a, b)
        a.send(b'{"to":"all"}\n')
        assert b.read_line() == b'{"content":"{\\"to\\":\\"all\\"}","remote_addr":"%s"}\n' % a.addr.encode()
        script.proc.send_signal(signal.SIGINT)
        assert a.read_to_eof() == SHUTDOWN_NOTICE
        assert b.read_to_eof() == SHUTDOWN_NOTICE
        assert script.wait() == 0
    finally:
        script.kill()
    assert script.stdout() == [
        f"[DEBUG] Loaded config from: {path}",
        "[DEBUG] Config requested version 'corecast' -> resolved to 'corecast.summoner'",
        "run returned",
    ]
    assert any(" - hooked - INFO - listening on " in line for line in script.stderr())


def test_a_config_error_through_the_sdk_raises_config_error(tmp_path):
    path = tmp_path / "server_config.json"
    path.write_text(json.dumps({"version": "corecast", "hyper_parameters": {"quarantine_by": "mac"}}))
    script = Script(
        textwrap.dedent(
            f"""
            from summoner.server import SummonerServer
            try:
                SummonerServer(name="hooked").run(port=0, config_path={str(path)!r})
            except Exception as e:
                print(f"{{type(e).__module__}}.{{type(e).__name__}}:", e, flush=True)
            """
        ),
        extra_path=STANDIN_SDK,
    )
    assert script.wait() == 0
    assert script.stdout()[-1] == (
        'corecast._errors.ConfigError: hyper_parameters.quarantine_by: expected "ip" or "addr", found "mac"'
    )


def test_without_the_sdk_the_import_says_so(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import corecast.summoner"], capture_output=True, timeout=PATIENCE, cwd=tmp_path
    )
    assert out.returncode == 1
    assert "ImportError: corecast.summoner needs the Summoner SDK" in out.stderr.decode()
    # The unrelated PyPI project of the same name is not mistaken for the SDK.
    (tmp_path / "summoner").mkdir()
    (tmp_path / "summoner" / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-c", "import corecast.summoner"],
        capture_output=True,
        timeout=PATIENCE,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 1
    assert "ImportError: corecast.summoner needs the Summoner SDK" in out.stderr.decode()


def test_the_hook_registers_both_versions_when_the_sdk_is_imported_and_not_before():
    script = Script(
        textwrap.dedent(
            """
            import sys
            print("corecast" in sys.modules, flush=True)
            from summoner.server import server as sdk
            print(sorted(sdk.RUST_MODULES), flush=True)
            print(all(sdk.RUST_MODULES[v] is sys.modules["corecast.summoner"] for v in ("corecast", "rust_corecast")))
            """
        ),
        extra_path=STANDIN_SDK,
    )
    assert script.wait() == 0, script.stderr()
    assert script.stdout() == ["False", "['corecast', 'rust_corecast']", "True"]


def test_a_summoner_package_that_is_not_the_sdk_is_left_alone(tmp_path):
    # PyPI's unrelated `summoner` project: no RUST_MODULES, so nothing to register.
    package = tmp_path / "summoner" / "server"
    package.mkdir(parents=True)
    (tmp_path / "summoner" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text("VALUE = 1\n")
    script = Script(
        "import sys, summoner.server.server as s; print(s.VALUE, 'corecast' in sys.modules)", extra_path=tmp_path
    )
    assert script.wait() == 0, script.stderr()
    assert script.stdout() == ["1 False"]


def _sdk_script(config_path) -> str:
    return textwrap.dedent(
        f"""
        from summoner.server import SummonerServer
        try:
            SummonerServer(name="hooked").run(port=0, config_path={str(config_path)!r})
        except Exception as e:
            print(f"{{type(e).__name__}}: {{e}}", flush=True)
        else:
            print("run returned", flush=True)
        """
    )


def test_a_corecast_that_cannot_be_imported_fails_instead_of_falling_back(tmp_path):
    # A broken install: a `corecast` package without its Summoner backend shadows the
    # real one, so registering fails when the SDK is imported.
    (tmp_path / "shadow" / "corecast").mkdir(parents=True)
    (tmp_path / "shadow" / "corecast" / "__init__.py").write_text("")
    path = tmp_path / "server_config.json"
    path.write_text(json.dumps({"version": "corecast", "hyper_parameters": {"worker_threads": 1}}))
    script = Script(_sdk_script(path), extra_path=f"{tmp_path / 'shadow'}:{STANDIN_SDK}")
    assert script.wait() == 0, script.stderr()
    assert script.stdout()[-1].startswith(
        f"RuntimeError: the config asks for corecast, but corecast cannot be loaded in this Python ({sys.executable}): "
        "ImportError: cannot import name 'summoner' from 'corecast'"
    ), script.stdout()
    assert not any("Python server listening" in line for line in script.stderr())


def test_a_missing_binary_fails_through_the_sdk(tmp_path):
    path = tmp_path / "server_config.json"
    path.write_text(json.dumps({"version": "corecast", "hyper_parameters": {"worker_threads": 1}}))
    missing = tmp_path / "no-such-corecast"
    script = Script(_sdk_script(path), extra_path=STANDIN_SDK, env={"CORECAST_BINARY": str(missing)})
    assert script.wait() == 0, script.stderr()
    assert script.stdout()[-1] == f"CorecastError: CORECAST_BINARY={missing} is not an executable file"


def test_a_python_without_corecast_refuses_rust_corecast(tmp_path):
    # "version": "rust_corecast" is refused by the SDK itself in an interpreter where
    # corecast is not installed (here a fresh venv holding nothing but the stand-in SDK).
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)
    path = tmp_path / "server_config.json"
    path.write_text(json.dumps({"version": "rust_corecast"}))
    out = subprocess.run(
        [str(bare / "bin" / "python"), "-c", _sdk_script(path)],
        env={"PYTHONPATH": str(STANDIN_SDK), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=PATIENCE,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().splitlines()[-1] == (
        "RuntimeError: Rust backend 'rust_corecast' requested but not available. Installed options: (none)"
    )
