"""Captions → images: drawing and the CLIP rerank (``draw``), finding and checking the models (``models``), what is
written to look at (``records``) and the stage (``run``).
"""
