-- Searches by caller go through CallerIpKey (an address or a network is a key range), so the
-- index on the address text only cost every write an extra B-tree insert.
DROP INDEX IF EXISTS GatehouseGatewayLogs_Caller;
