"""The engine seams: Ray (``ray_seam``) and DeepSpeed (``ds_seam``), the only modules that import them, and
progress lines (``progress``).
"""
