"""Builds the config file the binary reads, from what a Python caller gave.

Two sources: the arguments of :func:`corecast.run` / :class:`corecast.Server` (a host, a
port, a config path or dict), and the payload the Summoner SDK hands a Rust backend. Both
end as one complete ``server_config.json`` for ``corecast --config``, so that the binary
does all validation and every refusal carries its message and JSON path.

Host and port follow the Summoner SDK's rule for its Rust backends: a value in the config
wins over the argument, and an empty or null value (or port 0) falls back to the argument.
"""

import json
from copy import deepcopy
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ._errors import ConfigError

PathLike = Union[str, "Path"]

#: The keys of the SDK's payload that are not hyper parameters.
PAYLOAD_TOP_LEVEL = ("host", "port", "logger")


def effective_config(
    host: Any,
    port: Any,
    config_path: Optional[PathLike],
    config_dict: Optional[Mapping[str, Any]],
) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """Returns ``(config, None)`` to write out, or ``(None, path)`` to pass through.

    A file that cannot be read or parsed here is passed to the binary unchanged, so that
    the refusal is corecast's own (exit 78, naming the file) rather than a Python one.
    """
    if config_dict is not None:
        if not isinstance(config_dict, Mapping):
            raise TypeError(f"config_dict must be a dict or None, got {type(config_dict).__name__}")
        config: Any = deepcopy(dict(config_dict))
    elif config_path is not None:
        path = Path(config_path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None, path
        if not isinstance(config, dict):
            return None, path
    else:
        config = {}
    hyper = config.get("hyper_parameters")
    legacy = hyper if isinstance(hyper, dict) else {}
    for key, argument in (("host", host), ("port", port)):
        if config.get(key):
            continue
        config.pop(key, None)
        # Older Summoner configs keep host and port under hyper_parameters; corecast
        # applies those when the top level lacks them.
        if not legacy.get(key):
            config[key] = argument
    return config, None


def dump_config(config: Mapping[str, Any]) -> str:
    """The config as JSON text; a value JSON cannot carry is a :class:`ConfigError`."""
    try:
        return json.dumps(config, allow_nan=False, indent=2)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config is not representable as JSON: {e}") from None


def config_from_payload(payload: Mapping[str, Any]) -> Dict[str, Any]:
    """Rebuilds a corecast ``server_config.json`` from a Summoner backend payload.

    The SDK calls a Rust backend with ``{"host", "port", "logger", **hyper_parameters}``:
    the hyper parameters flattened to the top level beside the three fixed keys. Every
    other key is therefore a hyper parameter and goes back under ``hyper_parameters``
    unchanged: the reference's keys, corecast's extensions (``max_line_bytes``,
    ``cluster``, ...) and unknown keys alike (corecast warns about those by name).
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    rest = deepcopy(dict(payload))
    config: Dict[str, Any] = {"version": "corecast"}
    for key in PAYLOAD_TOP_LEVEL:
        if key in rest:
            config[key] = rest.pop(key)
    config["hyper_parameters"] = rest
    return config
