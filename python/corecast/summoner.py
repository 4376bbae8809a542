"""The Summoner SDK hook: ``import corecast.summoner`` and ``"version": "corecast"``.

``SummonerServer.run`` looks its config's ``"version"`` up in the dict
``summoner.server.server.RUST_MODULES`` and, when found, calls the module's
``start_tokio_server(name, payload)`` with ``payload`` =
``{"host", "port", "logger", **hyper_parameters}``, host and port already resolved
(config over ``run()``'s arguments). Importing this module adds itself to that dict under
``"corecast"``; :func:`start_tokio_server` rebuilds a corecast config from the payload and
runs corecast in the foreground, as the SDK's own Rust backends do.
"""

import sys
from typing import Any, Mapping

from ._config import config_from_payload
from ._server import run

#: The ``"version"`` value that selects corecast in a Summoner ``server_config.json``.
VERSION = "corecast"

try:
    from summoner.server import server as _sdk_server
except ImportError as _missing:
    raise ImportError(
        "corecast.summoner needs the Summoner SDK (the `summoner` package of "
        "Summoner-Network/summoner-core), which is not installed in this environment; "
        "the PyPI project named `summoner` is a different package"
    ) from _missing

if not isinstance(getattr(_sdk_server, "RUST_MODULES", None), dict):
    raise ImportError(
        "corecast.summoner: the installed `summoner` package has no "
        "summoner.server.server.RUST_MODULES dict, so it is not a Summoner SDK "
        "corecast can register with"
    )


def start_tokio_server(name: str, payload: Mapping[str, Any]) -> None:
    """Called by ``SummonerServer.run``: runs corecast until SIGINT/SIGTERM drains it."""
    config = config_from_payload(payload)
    # The payload's host and port are already resolved; passing them as the arguments
    # too keeps an explicit port 0 (any free port) from falling back to 8888.
    run(config.get("host", "127.0.0.1"), config.get("port", 8888), config_dict=config, name=name)


_sdk_server.RUST_MODULES[VERSION] = sys.modules[__name__]

__all__ = ["VERSION", "config_from_payload", "start_tokio_server"]
