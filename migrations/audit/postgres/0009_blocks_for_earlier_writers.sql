-- Calls written by a gateway of a version before 0007 get their block in the word index as they
-- are written. Such a gateway, still running while the others are upgraded (a rolling upgrade),
-- writes "SearchText" but no "SearchBlock"; without a block its calls would not be found by text
-- until `gatehouse-gateway reindex-audit` ran over the time of the upgrade.
--
-- The block is the one 0007 gave every call stored before it: the call's words, stripped of
-- positions, named by its "CorrelationId" (which coalesce("SearchBlock", "CorrelationId") finds)
-- and dated at the call's time, so in its day's partition. A replayed call whose block is there
-- already adds nothing. Calls of this version name their block (or have no words) and never fire
-- the trigger: its WHEN is checked per row, the function never runs.

CREATE FUNCTION "GatehouseBlockOfUnblockedCall"() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO "GatehouseSearchBlocks" ("BlockId", "TimeGenerated", "Words")
    VALUES (NEW."CorrelationId", NEW."TimeGenerated", strip(NEW."SearchText"))
    ON CONFLICT ("BlockId", "TimeGenerated") DO NOTHING;
    RETURN NEW;
END
$$;

CREATE TRIGGER "GatehouseCallContent_BlockOfUnblocked"
    BEFORE INSERT ON "GatehouseCallContent"
    FOR EACH ROW
    WHEN (NEW."SearchBlock" IS NULL AND length(NEW."SearchText") > 0)
    EXECUTE FUNCTION "GatehouseBlockOfUnblockedCall"();
