-- Calls are searched by user ignoring ASCII case: a user name is the token's `upn` or
-- `preferred_username` in the case Entra issued it (`Alice.Smith@Contoso.com`), an object id a
-- GUID that may be written in capitals; an auditor types either in any case. The searches compare
-- `UserId COLLATE NOCASE` and `UserName COLLATE NOCASE`, which these indexes serve.
DROP INDEX IF EXISTS GatehouseGatewayLogs_User;
DROP INDEX IF EXISTS GatehouseGatewayLogs_UserName;
CREATE INDEX GatehouseGatewayLogs_User ON GatehouseGatewayLogs (UserId COLLATE NOCASE, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_UserName ON GatehouseGatewayLogs (UserName COLLATE NOCASE, TimeGenerated);
