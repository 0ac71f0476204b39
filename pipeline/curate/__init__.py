"""Curating what a run trains on: per-run filters, near-duplicate detection, published embeddings in."""
