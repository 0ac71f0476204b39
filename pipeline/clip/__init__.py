"""CLIP through open_clip: loading and encoding (``model``), and train-clip, the run's own small CLIP (``train``).
"""
