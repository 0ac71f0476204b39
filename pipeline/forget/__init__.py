"""Takedowns: a URL, image hash or key removed from every derived artefact of a run, and the models that saw it."""
