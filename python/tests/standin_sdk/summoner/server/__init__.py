from .server import SummonerServer

__all__ = ["SummonerServer"]
