-- The version an edit form carries (optimistic concurrency, docs/portal.md "Two admins at once"):
-- a row's `updated_at`, which every change the portal makes sets. Access rules, pools and
-- settings have it; pool members get it here. Members written before it take their pool's; one
-- written around the portal without it gets the epoch (the same default as on SQLite).
ALTER TABLE pool_members ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT '1970-01-01T00:00:00Z';

UPDATE pool_members
   SET updated_at = backend_pools.updated_at
  FROM backend_pools
 WHERE backend_pools.id = pool_members.pool_id;
