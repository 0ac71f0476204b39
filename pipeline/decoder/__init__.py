"""DALL-E 2's decoder: a diffusion U-Net from a CLIP image embedding to pixels (``model``), its data, image shards
joined by key with the token shards' CLIP embeddings (``data``), its trainer on the priors' engine (``train``) and
weights (``checkpoints``), the caption → prior → decoder chain and variations (``sampling``) and its held-out
evaluation (``eval``)."""
