"""Both priors on one engine: DALL-E 1's transformer (``transformer``), DALL-E 2's diffusion prior (``diffusion``),
what the engine trains (``objectives``), the token loader (``loader``, ``rows``), the trainer (``train``), checkpoints
and weights (``checkpoints``), FLOPs and MFU (``metrics``) and held-out evaluation (``eval``).
"""
