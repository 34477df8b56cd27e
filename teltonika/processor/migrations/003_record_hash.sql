-- The positions key becomes (device_id, ts, record_hash): two different records of one
-- device in the same second (an event and the periodic record of that second, several IO
-- events together) are two rows, while a resend of the same record is still a duplicate.
-- record_hash is the first 8 bytes of SHA-256 of the record's canonical text (README,
-- "The record contract"; teltonika/processor/identity.py computes it for new rows).
-- Upgrades a table created by 001 in place: add the column, compute it for the rows
-- already stored, swap the unique key. The UPDATE rewrites every row once, inside this
-- migration's transaction; on a large table run VACUUM positions afterwards.

-- The canonical text, computed from a stored row. Kept in the schema as the reference
-- implementation (and for tests that compare it with the processor's own computation).
CREATE OR REPLACE FUNCTION teltonika_record_hash(
    ts timestamptz, latitude numeric, longitude numeric, altitude integer, angle integer,
    speed integer, satellites integer, priority smallint, event_io_id integer,
    generation_type smallint, io jsonb
) RETURNS bigint LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT ('x' || left(encode(sha256(convert_to(concat_ws('|',
        (extract(epoch FROM ts) * 1000)::bigint,
        trim_scale(latitude), trim_scale(longitude), altitude, angle, speed, satellites,
        priority, event_io_id, coalesce(generation_type::text, ''),
        '{' || coalesce((
            SELECT string_agg(to_jsonb(key)::text || ':' || value::text, ','
                              ORDER BY key COLLATE "C")
            FROM jsonb_each(io)), '') || '}'
    ), 'UTF8')), 'hex'), 16))::bit(64)::bigint
$$;

ALTER TABLE positions ADD COLUMN IF NOT EXISTS record_hash bigint;

UPDATE positions
SET record_hash = teltonika_record_hash(ts, latitude, longitude, altitude, angle, speed,
                                        satellites, priority, event_io_id, generation_type, io)
WHERE record_hash IS NULL;

ALTER TABLE positions ALTER COLUMN record_hash SET NOT NULL;
ALTER TABLE positions DROP CONSTRAINT IF EXISTS positions_device_ts;
-- Its btree also answers "latest position of a device" (teltonika/processor/state.py:
-- ORDER BY ts DESC walks it backwards; equal timestamps are ordered on the few rows
-- that share one), so still no second index on the write path.
ALTER TABLE positions ADD CONSTRAINT positions_record UNIQUE (device_id, ts, record_hash);
