"""stockhold: a high-throughput async inventory reservation service (gRPC + Redis Lua)."""

__version__ = "0.1.0"
