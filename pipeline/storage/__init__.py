"""The on-disk contracts every stage shares: the commit protocol and run record (``commit``), checkpoint commits
(``checkpoints``), the token shard schema (``schema``) and reading committed image shards (``shards``).
"""
