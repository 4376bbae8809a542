"""Stand-in for ``summoner.server.server``: the part of the Summoner SDK that picks a
Rust backend, reproduced from its documented behaviour for tests that cannot install the
SDK itself (it is not on PyPI).

What it reproduces, because the corecast hook depends on it:

- ``RUST_MODULES`` is a module-level dict from a config ``"version"`` to a module;
- ``SummonerServer(name).run(host, port, config_path=None, config_dict=None)`` loads the
  JSON file (a missing or unreadable file reads as ``{}``) unless ``config_dict`` is given;
- a ``version`` found in ``RUST_MODULES`` calls ``module.start_tokio_server(name, payload)``
  with ``payload = {"host": config host or run()'s host, "port": config port or run()'s
  port, "logger": config logger or {}, **hyper_parameters}`` and returns afterwards, a
  ``KeyboardInterrupt`` from it being swallowed;
- an unnamed server is called ``"<server:no-name>"``.

The SDK's pure-Python relay (used for any other version) is not reproduced.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional

RUST_MODULES: Dict[str, Any] = {}


def _load(config_path: Optional[str]) -> Dict[str, Any]:
    if config_path is None:
        return {}
    try:
        return json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class SummonerServer:
    def __init__(self, name: Optional[str] = None):
        self.name = name if isinstance(name, str) else "<server:no-name>"

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
            raise TypeError(f"config_dict must be a dict or None, got {type(config_dict).__name__}")
        backend = RUST_MODULES.get(config.get("version"))
        if backend is None:
            raise NotImplementedError("the stand-in SDK has no Python relay; use a registered Rust backend")
        payload = {
            "host": config.get("host") or host,
            "port": config.get("port") or port,
            "logger": config.get("logger", {}),
            **config.get("hyper_parameters", {}),
        }
        try:
            backend.start_tokio_server(self.name, payload)
        except KeyboardInterrupt:
            pass
