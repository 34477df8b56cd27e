"""The live broadcast of ``twistd teltonika-processor --live``: positions pushed to
browsers over a WebSocket (protocol ``teltonika-live.v1``, ``docs/live-v1.rst``) and the
operator map page. README.rst, "Live positions", explains how to run it.

Modules, each with one job:

* :mod:`~teltonika.processor.live.messages`: the wire messages (pure);
* :mod:`~teltonika.processor.live.handshake`: origin and credential decisions (pure);
* :mod:`~teltonika.processor.live.latest`: each device's newest position (the snapshot
  source and the ordering rule);
* :mod:`~teltonika.processor.live.loader`: devices missing from it, from PostgreSQL;
* :mod:`~teltonika.processor.live.fanout`: the ``XREAD`` reader feeding the hub;
* :mod:`~teltonika.processor.live.hub`: topics, subscriptions, batching, conflation;
* :mod:`~teltonika.processor.live.session`: one connection's conversation;
* :mod:`~teltonika.processor.live.protocol`: the autobahn adapter and factory;
* :mod:`~teltonika.processor.live.interfaces`, :mod:`~teltonika.processor.live.directus`,
  :mod:`~teltonika.processor.live.local`, :mod:`~teltonika.processor.live.cache`: who may
  connect and watch what;
* :mod:`~teltonika.processor.live.site`, :mod:`~teltonika.processor.live.tiles` and
  ``static/``: the HTTP site and the page;
* :mod:`~teltonika.processor.live.options`, :mod:`~teltonika.processor.live.service`,
  :mod:`~teltonika.processor.live.metrics`: wiring into the processor.
"""
