-- Guarded TimescaleDB step: when the extension is installed AND preloaded, positions
-- becomes a hypertable partitioned on ts (the unique key contains ts, as Timescale
-- requires). Without it (the tested path) positions stays a plain table and this is a no-op.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries', true) LIKE '%timescaledb%' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('positions', 'ts', if_not_exists => TRUE, migrate_data => TRUE);
        RAISE NOTICE 'positions is a TimescaleDB hypertable';
    END IF;
END
$$;
