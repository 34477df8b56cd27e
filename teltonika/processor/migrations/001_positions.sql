-- The positions table: one row per AVL record, idempotent on (device_id, ts) (003 makes
-- the key (device_id, ts, record_hash)). Owned by the processor, the only table it owns
-- (docs/design.rst, 'The processor owns one table'); applied by
-- teltonika.processor.migrations.
CREATE TABLE IF NOT EXISTS positions (
    device_id       text          NOT NULL,  -- the IMEI
    ts              timestamptz   NOT NULL,  -- device time, millisecond precision
    received_at     timestamptz   NOT NULL,  -- ingestion server time
    latitude        numeric(10,7) NOT NULL,  -- exact decimal degrees, as the contract wrote them
    longitude       numeric(10,7) NOT NULL,
    altitude        integer       NOT NULL,  -- metres
    angle           integer       NOT NULL,  -- degrees
    speed           integer       NOT NULL,  -- km/h
    satellites      integer       NOT NULL,
    priority        smallint      NOT NULL,  -- 0 low, 1 high, 2 panic
    event_io_id     integer       NOT NULL,  -- 0 = periodic record
    generation_type smallint,                -- codec 16 only
    codec           text          NOT NULL,  -- 8 | 8E | 16
    instance_id     text          NOT NULL,  -- the ingestion instance
    io              jsonb         NOT NULL,  -- {"<io id>": integer | "<hex of NX bytes>"}
    -- The idempotency key (docs/design.rst, 'XACK after COMMIT'). Its btree also answers "latest position of
    -- a device" (ORDER BY ts DESC LIMIT 1 scans it backwards), so no second index.
    CONSTRAINT positions_device_ts UNIQUE (device_id, ts)
);
