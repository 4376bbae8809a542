"""Exceptions raised when corecast cannot start or stops on its own.

The messages are corecast's own sentences, taken from the binary's stderr, so a Python
user reads exactly what the command line would have printed.
"""

from typing import Optional, Sequence


class CorecastError(RuntimeError):
    """corecast failed to start, or exited without being asked to.

    A subclass of ``RuntimeError``, as the Summoner SDK's Rust backends raise, so code
    that guards ``SummonerServer.run`` keeps working.

    Attributes:
        message: corecast's sentence (without the ``corecast: error:`` prefix).
        returncode: the process's exit status (negative: killed by that signal), or
            ``None`` when the process never ran.
        log: the last lines corecast printed on stderr, oldest first.
    """

    def __init__(self, message: str, returncode: Optional[int] = None, log: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.returncode = returncode
        self.log = list(log)


class ConfigError(CorecastError):
    """The configuration was refused (corecast exits 78, EX_CONFIG, before binding).

    ``message`` names the JSON path of the offending value, e.g.
    ``hyper_parameters.rate_limit_msgs_per_minute: expected an integer, found "fast"``.
    """
