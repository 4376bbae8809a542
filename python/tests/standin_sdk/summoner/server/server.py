"""Stand-in for ``summoner.server.server``: the part of the Summoner SDK that picks a
backend, reproduced from the SDK's source (Summoner-Network/summoner-core,
``summoner/server/server.py``) for tests that cannot install the SDK (it is not on PyPI).

What it reproduces, because corecast's hook depends on it:

- at import, ``RUST_MODULES`` is filled from ``RUST_BACKENDS`` by importing each module
  by name (a missing one is skipped), and ``RUST_LATEST`` is the first one found;
- ``SummonerServer(name).run(host, port, config_path=None, config_dict=None)`` loads the
  JSON file (a missing, unreadable or invalid file reads as ``{}``, with a ``[DEBUG]``
  line on stdout) unless ``config_dict`` is given;
- the config's ``version`` resolves as the SDK does it: ``"rust"`` to ``RUST_LATEST``, a
  key of ``RUST_MODULES`` to its module, any other version starting with ``rust`` to a
  ``RuntimeError`` naming the installed options, and everything else (``None``,
  ``"python"``, ``"corecast"`` when nothing registered it) to the pure-Python relay;
- a resolved backend is called as ``module.start_tokio_server(name, payload)`` with
  ``payload = {"host": config host or run()'s host, "port": config port or run()'s
  port, "logger": config logger or {}, **hyper_parameters}``, after a ``[DEBUG]`` line
  naming the module, and ``run`` returns afterwards, a ``KeyboardInterrupt`` from it being
  swallowed;
- the pure-Python relay listens on run()'s host and port (not the config's), logs
  ``Python server listening on HOST:PORT.`` and relays each line to the other clients;
- an unnamed server is called ``"<server:no-name>"``.
"""

import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

RUST_BACKENDS = {
    "rust_v1.1.0": "rust_server_v1_1_0",
    "rust_v1.0.0": "rust_server_v1_0_0",
}

RUST_MODULES: Dict[str, Any] = {}
RUST_LATEST = None

for _key, _modname in RUST_BACKENDS.items():
    try:
        _module = importlib.import_module(_modname)
    except ModuleNotFoundError:
        continue
    RUST_MODULES[_key] = _module
    if RUST_LATEST is None:
        RUST_LATEST = _module


def _load(config_path: Optional[str]) -> Dict[str, Any]:
    if config_path is None:
        print("[DEBUG] Config file is `None`")
        return {}
    path = Path(config_path)
    if not path.is_file():
        print(f"[DEBUG] Config file not found: {config_path}")
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"[DEBUG] error reading {config_path}: {e}")
        return {}
    print(f"[DEBUG] Loaded config from: {config_path}")
    return config


class SummonerServer:
    def __init__(self, name: Optional[str] = None):
        self.name = name if isinstance(name, str) else "<server:no-name>"
        self.logger = logging.getLogger(self.name)
        self.clients: set = set()

    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 8888,
        config_path: Optional[str] = None,
        config_dict: Optional[Dict[str, Any]] = None,
    ) -> None:
        if config_dict is None:
            config = _load(config_path)
        elif isinstance(config_dict, dict):
            config = dict(config_dict)
        else:
            raise TypeError(f"SummonerServer.run: config_dict must be a dict or None, got {type(config_dict).__name__}")
        option = config.get("version", None)
        mod = None
        if option == "rust":
            mod = RUST_LATEST
        elif option in RUST_MODULES:
            mod = RUST_MODULES[option]
        elif isinstance(option, str) and option.startswith("rust"):
            available = (
                ", ".join(["rust"] + list(RUST_MODULES.keys())) if RUST_LATEST else ", ".join(RUST_MODULES.keys())
            )
            raise RuntimeError(
                f"Rust backend '{option}' requested but not available. Installed options: {available or '(none)'}"
            )
        if mod is not None:
            payload = {
                "host": config.get("host") or host,
                "port": config.get("port") or port,
                "logger": config.get("logger", {}),
                **config.get("hyper_parameters", {}),
            }
            try:
                requested = option if option is not None else "(unset)"
                print(f"[DEBUG] Config requested version '{requested}' -> resolved to '{mod.__name__}'")
                mod.start_tokio_server(self.name, payload)
            except KeyboardInterrupt:
                pass
            return
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s - %(name)s - %(message)s")
        try:
            asyncio.run(self._serve(host, port))
        except KeyboardInterrupt:
            pass

    async def _serve(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._client, host=host, port=port)
        self.logger.info(f"Python server listening on {host}:{port}.")
        async with server:
            await server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        addr = f"{host}:{port}"
        self.clients.add(writer)
        try:
            while True:
                data = await reader.readline()
                if not data:
                    return
                line = data.decode().rstrip("\n")
                for other in list(self.clients):
                    if other is not writer:
                        other.write((json.dumps({"remote_addr": addr, "content": line}) + "\n").encode())
                        await other.drain()
        finally:
            self.clients.discard(writer)
            writer.close()
