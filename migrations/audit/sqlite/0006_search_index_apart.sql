-- The full-text index moves to a file of its own beside the store (migrations/audit/sqlite-search),
-- written by its own connection in parallel with the store's writer. The store builds the new
-- index from ApiManagementGatewayLlmLog's pieces in the background after this migration; searches
-- miss the calls not yet indexed until it has caught up.
DROP TABLE GatehouseContentSearch;
