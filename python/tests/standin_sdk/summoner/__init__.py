"""A stand-in for the Summoner SDK's package, for tests only (the SDK is not on PyPI)."""
