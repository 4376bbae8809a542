"""corecast from Python: the relay binary, started and supervised by a small API.

``pip install`` puts the ``corecast`` executable in the environment and this package
beside it. The package never reimplements the relay; it builds the config, starts the
binary and reads its readiness notification:

- :func:`run` blocks like ``SummonerServer.run`` until SIGINT or SIGTERM drains it;
- :class:`Server` starts in the background, reports its address, stops and waits, and
  works as a context manager;
- ``python -m corecast`` is the command line;
- :mod:`corecast.summoner` is a backend of the Summoner SDK (``"version": "corecast"`` or
  ``"rust_corecast"``), registered by the wheel's ``corecast.pth`` hook when the SDK is
  imported, so Summoner server scripts need no import line.
"""

from importlib import metadata as _metadata

from ._binary import BINARY_ENV, binary_path
from ._config import config_from_payload
from ._errors import ConfigError, CorecastError
from ._server import Server, run

try:
    __version__ = _metadata.version("corecast")
except _metadata.PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = "0+unknown"

__all__ = [
    "BINARY_ENV",
    "ConfigError",
    "CorecastError",
    "Server",
    "binary_path",
    "config_from_payload",
    "run",
]
