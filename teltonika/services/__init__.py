"""The services ``twistd`` runs around the device listeners, one job each:

* :mod:`.ingestion` — the ingestion service: listeners, sink and device authority,
  started in order and shut down as one ordered sequence;
* :mod:`.instance_lock` — refuses a second process with the same ``--instance-id`` on one
  Redis and host;
* :mod:`.ops_http` — the operations endpoint (``/metrics``, ``/healthz``, ``/readyz``),
  shared with the processor.
"""
