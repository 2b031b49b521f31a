-- Calls are searched by user ignoring ASCII case: a user name is the token's `upn` or
-- `preferred_username` in the case Entra issued it (`Alice.Smith@Contoso.com`), an object id a
-- GUID that may be written in capitals; an auditor types either in any case. The searches compare
-- lower("UserId" COLLATE "C") and lower("UserName" COLLATE "C") (ASCII letters only, whatever the
-- database's locale, as SQLite's NOCASE) with the ASCII-lower-cased value, which these indexes
-- serve. New day partitions get them from the parent.
DROP INDEX IF EXISTS "GatehouseGatewayLogs_User";
DROP INDEX IF EXISTS "GatehouseGatewayLogs_UserName";
CREATE INDEX "GatehouseGatewayLogs_User" ON "GatehouseGatewayLogs" ((lower("UserId" COLLATE "C")), "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_UserName" ON "GatehouseGatewayLogs" ((lower("UserName" COLLATE "C")), "TimeGenerated");
