"""``twistd teltonika-processor``: the telemetry stream into PostgreSQL, exactly once.

The ingestion server never imports this package. Its pieces, one job each:

* :mod:`.entries` — the record contract check and sentinel reversal (pure);
* :mod:`.identity` — a record's canonical content and the hash that keys its row (pure);
* :mod:`.database` — one psycopg connection on its own thread, off the reactor;
* :mod:`.migrations` — versioned SQL applied under an advisory lock, and the schema check;
* :mod:`.writer` — COPY + ``INSERT ... ON CONFLICT DO NOTHING``, bisection of bad rows;
* :mod:`.state` — bounded per-device latest position, and the one rule (Python and SQL)
  for which record is a device's latest;
* :mod:`.streams` — the Redis commands the consumer uses, parsed into plain values;
* :mod:`.fastreader` — the ``XREADGROUP`` connection whose replies hiredis decodes in C;
* :mod:`.consumer` — the read / write / acknowledge loop;
* :mod:`.trim` — safe ``XTRIM MINID`` over every consumer group;
* :mod:`.metrics`, :mod:`.service`, :mod:`.tap` — operations and wiring;
* :mod:`.live` — with ``--live``, the WebSocket broadcast of positions and the operator
  map page.
"""
