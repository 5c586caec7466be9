"""meshagent node agent: compiles and attaches the datapath, keeps it in line with the store."""

__version__ = "0.1.0"
