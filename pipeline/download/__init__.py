"""URL lists → committed image shards: ``planner`` splits the list, ``shard`` fetches and writes one shard through
``fetch`` (guarded HTTP/HTTPS over ``connections``: vetted-address sockets, the deadline watchdog, the keep-alive
pool), ``imaging`` (decode, check, resize) and ``writer`` (img2dataset's shard layout); ``owners`` is the run-wide
duplicate-image registry, ``runs`` keeps retry rounds and the summary, ``run`` is the stage.
"""
