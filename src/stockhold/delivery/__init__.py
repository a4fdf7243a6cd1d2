"""Pushing events to warehouse systems (issue 12, docs/events.md): durable subscriptions, the
deliverer every server process runs, lag, replay."""
