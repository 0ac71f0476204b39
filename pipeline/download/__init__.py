"""URL lists → committed image shards: ``planner`` splits the list, ``shard`` fetches and writes one shard through
``fetch`` (guarded HTTP) and ``imaging`` (decode, check, resize), ``runs`` keeps retry rounds and the summary, ``run``
is the stage.
"""
