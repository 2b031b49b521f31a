-- Bodies are stored compressed, the way SQLite's archive format ("sqlar") stores files: a BLOB,
-- zlib-compressed when that makes it smaller, with the original size beside it. The view inflates
-- them with sqlar_uncompress(data, size), which the store registers on its connections and which
-- the sqlite3 shell has built in, so queries of ApiManagementGatewayLogs read text as before.
-- Rows written before this migration hold TEXT and no size: sqlar_uncompress returns them as
-- they are.
ALTER TABLE GatehouseCallContent ADD COLUMN BackendRequestBodySize INTEGER;
ALTER TABLE GatehouseCallContent ADD COLUMN BackendResponseBodySize INTEGER;

DROP VIEW ApiManagementGatewayLogs;
CREATE VIEW ApiManagementGatewayLogs AS
SELECT l.*,
       CAST(sqlar_uncompress(c.BackendRequestBody, c.BackendRequestBodySize) AS TEXT) AS BackendRequestBody,
       CAST(sqlar_uncompress(c.BackendResponseBody, c.BackendResponseBodySize) AS TEXT) AS BackendResponseBody
FROM GatehouseGatewayLogs l
LEFT JOIN GatehouseCallContent c ON c.CorrelationId = l.CorrelationId;
