"""Image shards → token shards: decode and encode (``encode``), the exactly-once writer (``writer``), the stage
(``run``) and the clip-retrieval export (``export``).
"""
