-- Gatehouse audit store, SQLite: the full-text index of prompts and completions, in a file of its
-- own beside the store (`audit.db-search` beside `audit.db`), so that its own connection writes it
-- while the store's writer writes the rest of a batch (audit/src/sql/search_index.rs).

-- Contentless (the text is in the store's ApiManagementGatewayLlmLog); the rowid is the call's
-- RecordId in the store; rows can be deleted one by one when a call's content expires.
CREATE VIRTUAL TABLE GatehouseContentSearch USING fts5 (
    Prompt,
    Completion,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
-- A merge starts once 16 segments (not FTS5's default 4) of one level exist, which halves the
-- rewriting a steady stream of writes causes. It is done a little with each batch: only at 64
-- segments of one level (not FTS5's default 16, which made every merge at 16 a "crisis" merge of
-- the whole level at once, stalling one batch for 1.3-1.5 s in 50,000 records) does a write merge
-- a whole level at once.
INSERT INTO GatehouseContentSearch (GatehouseContentSearch, rank) VALUES ('automerge', 16);
INSERT INTO GatehouseContentSearch (GatehouseContentSearch, rank) VALUES ('crisismerge', 64);

-- The highest RecordId up to which the index holds every call; committed with each batch.
CREATE TABLE GatehouseSearchProgress (
    Id             INTEGER PRIMARY KEY CHECK (Id = 1),
    IndexedThrough INTEGER NOT NULL
);
INSERT INTO GatehouseSearchProgress (Id, IndexedThrough) VALUES (1, 0);
