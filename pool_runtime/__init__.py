"""What both pools share, so that neither imports the other: the handoff's messages, the worker
runtime, the Ray actor glue and worker tracing."""
