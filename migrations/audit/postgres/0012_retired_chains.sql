-- How far retention has removed each audit chain's calls: the highest "ChainSequence" of a chain
-- that a metadata retention run removed (a day's partition dropped whole, or rows deleted). The
-- writer stores a chain's records in sequence order, so a record of that chain at or below it
-- that is not in the store was stored and removed, and a replay of it (a journal days behind,
-- replayed again after a crash) is not stored and counted in the rollups a second time
-- (docs/audit.md, "Retention"). A row a chain (a gateway and a day); not partitioned.
CREATE TABLE "GatehouseRetiredChains" (
    "ChainId"     TEXT   NOT NULL PRIMARY KEY,
    "MaxSequence" BIGINT NOT NULL
);
