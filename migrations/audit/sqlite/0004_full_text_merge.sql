-- The full-text index merges its segments less eagerly: a merge starts once 16 segments (not
-- FTS5's default 4) of one level exist, which halves the rewriting a steady stream of writes
-- causes. A search reads a few more segments, which the read benchmark shows to stay well within
-- its target.
INSERT INTO GatehouseContentSearch (GatehouseContentSearch, rank) VALUES ('automerge', 16);
