"""The storage layer: script calls against Redis and the clients that carry them.

Nothing here knows about gRPC: the servicer and the engine stand on this layer, never the
other way round (docs/architecture.md, "Layout").
"""
