"""The embedded default dataset (``synth``), the loopback server that serves it (``server``) and the whole-pipeline
demo (``run``).
"""
