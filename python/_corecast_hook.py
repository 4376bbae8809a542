"""Registers corecast with the Summoner SDK when the SDK is imported: no import line needed.

The wheel installs ``corecast.pth`` beside this module in site-packages; the interpreter
runs its one line (``import _corecast_hook``) at start-up. That adds a finder to
``sys.meta_path`` and nothing else: neither corecast nor the SDK is imported until a
program imports ``summoner.server.server``. Right after that module has run (it fills
``RUST_MODULES`` with the SDK's own Rust backends), corecast is added to it under
``"corecast"`` and ``"rust_corecast"``, so an unchanged ``SummonerServer(...).run(...)``
with either version in its config runs corecast.

It fails closed: if corecast cannot be imported at that point, both versions are
registered to a backend whose ``start_tokio_server`` raises the reason, so a config that
asks for corecast never falls back to the SDK's pure-Python server. A ``summoner`` module
without ``RUST_MODULES`` (PyPI's unrelated project of that name) is left alone.

This module must stay cheap and must never break interpreter start-up: it imports only
``sys``, and every error while registering becomes the failing backend.
"""

import sys

#: The SDK module whose ``RUST_MODULES`` dict maps a config's ``"version"`` to a backend.
SDK_MODULE = "summoner.server.server"

#: The config versions that select corecast. The SDK refuses a ``rust``-prefixed version
#: it cannot resolve, so ``rust_corecast`` fails even where corecast is not installed.
VERSIONS = ("corecast", "rust_corecast")


class _Unavailable:
    """The backend registered when corecast cannot be imported: it raises why."""

    __name__ = "corecast.summoner"

    def __init__(self, reason: str):
        self.reason = reason

    def start_tokio_server(self, name, payload):
        raise RuntimeError(
            "the config asks for corecast, but corecast cannot be loaded in this Python "
            f"({sys.executable}): {self.reason}; reinstall corecast in this Python"
        )


def register(sdk) -> None:
    """Adds corecast to ``sdk.RUST_MODULES`` (an imported ``summoner.server.server``)."""
    modules = getattr(sdk, "RUST_MODULES", None)
    if not isinstance(modules, dict):
        return  # not the Summoner SDK
    try:
        from corecast import summoner as backend

        backend.register(sdk)
    except Exception as e:  # any failure must surface when corecast is asked for
        unavailable = _Unavailable(f"{type(e).__name__}: {e}")
        for version in VERSIONS:
            modules[version] = unavailable


class _RegisteringLoader:
    """Runs the SDK module with its own loader, then registers corecast in it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register(module)

    def __getattr__(self, name):  # get_code, get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _SdkFinder:
    """Finds ``summoner.server.server`` through the other finders and wraps its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != SDK_MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if isinstance(finder, _SdkFinder) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegisteringLoader(spec.loader)
            return spec
        return None


def install() -> None:
    """Puts the finder first on ``sys.meta_path`` (once) or registers at once."""
    sdk = sys.modules.get(SDK_MODULE)
    if sdk is not None:
        register(sdk)
    if not any(isinstance(finder, _SdkFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SdkFinder())


install()
