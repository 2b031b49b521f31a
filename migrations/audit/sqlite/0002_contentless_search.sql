-- The full-text index keeps no copy of its own of prompts and completions (they are stored in
-- ApiManagementGatewayLlmLog already): a contentless FTS5 table whose rowid is the call's
-- RecordId, whose rows retention can still delete one by one.
CREATE VIRTUAL TABLE GatehouseContentSearchIndex USING fts5 (
    Prompt,
    Completion,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO GatehouseContentSearchIndex (rowid, Prompt, Completion)
    SELECT rowid, Prompt, Completion FROM GatehouseContentSearch;
DROP TABLE GatehouseContentSearch;
ALTER TABLE GatehouseContentSearchIndex RENAME TO GatehouseContentSearch;
