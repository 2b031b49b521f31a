-- How prompts, completions and their full-text vectors are stored, for a cheaper write
-- (bench/README.md, "PostgreSQL: the full-text vector built by the store"):
--
-- 1. The full-text vector ("SearchText", ≈ 4–6 KB for 4 KB of prompt and completion) is
--    compressed with lz4 like the bodies since 0003, not the default pglz (5 % of the server's
--    time writing a call). Only new values are compressed with lz4; stored ones stay readable.
-- 2. Rows of bodies and of LLM-log pieces are compressed only past 8,160 bytes (storage
--    parameter toast_tuple_target; PostgreSQL's default is 2,032), so that a call's 2 KB prompt
--    or completion piece is stored in its row as it is, and its bodies and vector compressed in
--    the row, rather than cut into chunks in the TOAST table.
--
-- PostgreSQL keeps storage parameters on partitions only, and does not pass a column's
-- compression down to existing partitions: both are set here on each partition that exists; new
-- partitions take the compression from the parent and the storage parameter from the store
-- (partitions.rs). Rows already stored keep their form.
DO $$
DECLARE
    partition regclass;
    has_lz4 boolean := EXISTS (
        SELECT 1 FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    );
BEGIN
    IF has_lz4 THEN
        ALTER TABLE "GatehouseCallContent" ALTER COLUMN "SearchText" SET COMPRESSION lz4;
    END IF;
    FOR partition IN
        SELECT inhrelid::regclass FROM pg_inherits
        WHERE inhparent = '"GatehouseCallContent"'::regclass
    LOOP
        IF has_lz4 THEN
            EXECUTE format('ALTER TABLE %s ALTER COLUMN "SearchText" SET COMPRESSION lz4', partition);
        END IF;
        EXECUTE format('ALTER TABLE %s SET (toast_tuple_target = 8160)', partition);
    END LOOP;
    FOR partition IN
        SELECT inhrelid::regclass FROM pg_inherits
        WHERE inhparent = '"GatehouseLlmLogPieces"'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s SET (toast_tuple_target = 8160)', partition);
    END LOOP;
END
$$;
