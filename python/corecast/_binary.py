"""Finds the ``corecast`` executable that ``pip install`` put beside this package.

maturin's ``bindings = "bin"`` installs the binary into the environment's scripts
directory (``<venv>/bin``), which is not necessarily on ``PATH`` (a venv that was never
activated). The package's own install record names it exactly, whatever the install
scheme (venv, ``--user``, ``--prefix``), so that is asked first.
"""

import os
import shutil
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import Optional

from ._errors import CorecastError

#: Set to a path to run another build (for example ``target/release/corecast``).
BINARY_ENV = "CORECAST_BINARY"

_EXE = "corecast"


def _from_install_record() -> Optional[Path]:
    try:
        dist = metadata.distribution("corecast")
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        # The record lists the binary relative to site-packages, e.g. ../../../bin/corecast.
        if entry.name == _EXE and entry.parent.name in ("bin", "scripts"):
            path = Path(dist.locate_file(entry)).resolve()
            if os.access(path, os.X_OK):
                return path
    return None


def binary_path() -> Path:
    """The path of the ``corecast`` executable this package runs.

    Raises :class:`CorecastError` when no executable can be found.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise CorecastError(f"{BINARY_ENV}={override} is not an executable file")
        return path
    found = _from_install_record()
    if found is not None:
        return found
    scripts = Path(sysconfig.get_path("scripts")) / _EXE
    if os.access(scripts, os.X_OK):
        return scripts
    on_path = shutil.which(_EXE)
    if on_path:
        return Path(on_path)
    raise CorecastError(
        "the corecast executable is not installed: install the package with "
        "`pip install corecast` (or `pip install .` in a checkout), "
        f"or set {BINARY_ENV} to a built binary"
    )
