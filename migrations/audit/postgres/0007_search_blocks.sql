-- The full-text word index moves from single calls to blocks of calls (bench/README.md, "What the
-- full-text word index costs PostgreSQL"): the GIN over each call's "SearchText" held one entry
-- per distinct word of every call (≈ 250 a call) and cost about half of the server's time
-- writing one. Now a block of up to 64 calls of one batch and one UTC day gets one row in
-- "GatehouseSearchBlocks" with the union of their words, without positions, under the GIN; each
-- call keeps its own vector with positions in "SearchText", no longer indexed, and names its
-- block in "SearchBlock". A search asks the index for the blocks that hold every word, then
-- checks the calls of those blocks one by one against their own vectors (phrases included).
--
-- Calls stored before this migration keep "SearchBlock" NULL and get a block of their own here,
-- named by their "CorrelationId" (a new block's id is a random UUID, so the two never meet): a
-- call's block is coalesce("SearchBlock", "CorrelationId"), and that is what the block index
-- below holds. A block's "TimeGenerated" is the UTC midnight of its calls' day (a call's own time
-- for the blocks made here), so the day partitions of blocks and of content line up.

CREATE TABLE "GatehouseSearchBlocks" (
    "BlockId" text NOT NULL,
    "TimeGenerated" timestamptz NOT NULL,
    "Words" tsvector NOT NULL
) PARTITION BY RANGE ("TimeGenerated");

-- The same partitions as the content table has: its days, its months and DEFAULT.
DO $$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = '"GatehouseCallContent"'::regclass
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF "GatehouseSearchBlocks" %s',
            replace(part.name, 'GatehouseCallContent', 'GatehouseSearchBlocks'),
            part.bound
        );
    END LOOP;
END
$$;

-- A block's words are compressed with lz4 where the server has it, like the vectors (0003).
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) THEN
        ALTER TABLE "GatehouseSearchBlocks" ALTER COLUMN "Words" SET COMPRESSION lz4;
    END IF;
END
$$;

INSERT INTO "GatehouseSearchBlocks" ("BlockId", "TimeGenerated", "Words")
SELECT "CorrelationId", "TimeGenerated", strip("SearchText")
FROM "GatehouseCallContent"
WHERE length("SearchText") > 0;

ALTER TABLE "GatehouseCallContent" ADD COLUMN "SearchBlock" text;

ALTER TABLE "GatehouseSearchBlocks"
    ADD CONSTRAINT "GatehouseSearchBlocks_pkey" PRIMARY KEY ("BlockId", "TimeGenerated");
CREATE INDEX "GatehouseSearchBlocks_Words" ON "GatehouseSearchBlocks" USING GIN ("Words");
-- A detailed sample of the words, as 0005 keeps of the vectors, so that the planner estimates a
-- rare word as rare (the store copies it to partitions it creates later).
ALTER TABLE "GatehouseSearchBlocks" ALTER COLUMN "Words" SET STATISTICS 1000;

CREATE INDEX "GatehouseCallContent_Block" ON "GatehouseCallContent" ((coalesce("SearchBlock", "CorrelationId")));
DROP INDEX "GatehouseCallContent_Search";
