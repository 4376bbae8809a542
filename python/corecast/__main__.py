"""``python -m corecast ...``: the corecast command line, exactly.

The Python process becomes the binary (exec), so arguments, signals, output and exit
status are the binary's own.
"""

import os
import sys

from . import CorecastError, binary_path


def main() -> None:
    try:
        binary = str(binary_path())
    except CorecastError as e:
        sys.exit(f"corecast: error: {e}")
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
