"""The Summoner SDK backend: ``"version": "corecast"`` in a Summoner ``server_config.json``.

``SummonerServer.run`` looks its config's ``"version"`` up in the dict
``summoner.server.server.RUST_MODULES`` and, when found, calls the module's
``start_tokio_server(name, payload)`` with ``payload`` =
``{"host", "port", "logger", **hyper_parameters}``, host and port already resolved
(config over ``run()``'s arguments). :func:`register` adds this module to that dict under
``"corecast"`` and ``"rust_corecast"``; :func:`start_tokio_server` rebuilds a corecast
config from the payload and runs corecast in the foreground, as the SDK's own Rust
backends do.

Nobody needs to import this module: the wheel's ``corecast.pth`` hook (``_corecast_hook``)
registers it when the SDK is imported. Importing it explicitly, as older scripts do,
registers it at once and is harmless.
"""

import importlib
import sys
from typing import Any, Mapping

from ._config import config_from_payload
from ._server import run

#: The ``"version"`` value that selects corecast in a Summoner ``server_config.json``.
VERSION = "corecast"

#: The same backend under a ``rust`` prefix: the SDK itself raises for a ``rust...``
#: version it cannot resolve, so this one fails even in a Python without corecast.
VERSIONS = (VERSION, "rust_corecast")

#: The SDK module that holds ``RUST_MODULES``.
SDK_MODULE = "summoner.server.server"


def start_tokio_server(name: str, payload: Mapping[str, Any]) -> None:
    """Called by ``SummonerServer.run``: runs corecast until SIGINT/SIGTERM drains it."""
    config = config_from_payload(payload)
    # The payload's host and port are already resolved; passing them as the arguments
    # too keeps an explicit port 0 (any free port) from falling back to 8888.
    run(config.get("host", "127.0.0.1"), config.get("port", 8888), config_dict=config, name=name)


def register(sdk: Any) -> None:
    """Adds this module to ``sdk.RUST_MODULES`` under every name in :data:`VERSIONS`."""
    modules = getattr(sdk, "RUST_MODULES", None)
    if not isinstance(modules, dict):
        raise ImportError(
            "corecast.summoner: the installed `summoner` package has no "
            "summoner.server.server.RUST_MODULES dict, so it is not a Summoner SDK "
            "corecast can register with"
        )
    for version in VERSIONS:
        modules[version] = sys.modules[__name__]


def _sdk() -> Any:
    # While the hook registers, the SDK module is still being imported: take it as it is.
    found = sys.modules.get(SDK_MODULE)
    if found is not None:
        return found
    try:
        return importlib.import_module(SDK_MODULE)
    except ImportError as missing:
        raise ImportError(
            "corecast.summoner needs the Summoner SDK (the `summoner` package of "
            "Summoner-Network/summoner-core), which is not installed in this environment; "
            "the PyPI project named `summoner` is a different package"
        ) from missing


register(_sdk())

__all__ = ["VERSION", "VERSIONS", "config_from_payload", "register", "start_tokio_server"]
