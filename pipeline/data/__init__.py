"""The embedded default dataset and the loopback server that serves it."""
