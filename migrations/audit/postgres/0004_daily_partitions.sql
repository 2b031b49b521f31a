-- The per-call tables become PARTITIONED BY RANGE ("TimeGenerated"), one partition per UTC day
-- named "<table>_pYYYYMMDD" plus "<table>_default" for a time no day partition covers, so that
-- retention drops whole days instead of deleting row by row.
--
-- The LLM log is split: header rows (SequenceNumber 0, metadata) in "GatehouseLlmLogHeaders",
-- prompt and completion pieces (SequenceNumber > 0, content) in "GatehouseLlmLogPieces", so that
-- pieces can be dropped by day before the headers; "ApiManagementGatewayLlmLog" becomes a view
-- over both with Azure's columns.
--
-- Unique keys must hold the partition key: a call is identified by ("CorrelationId",
-- "TimeGenerated"), which a replayed record always repeats. The store creates the partitions of
-- the coming days itself (audit/src/sql/partitions.rs); this migration creates those of the days
-- (and months, below) that already hold rows and moves every row, in the migration's transaction.

DROP VIEW "ApiManagementGatewayLogs";
ALTER TABLE "GatehouseGatewayLogs" RENAME TO "GatehouseGatewayLogs_0003";
ALTER TABLE "GatehouseCallContent" RENAME TO "GatehouseCallContent_0003";
ALTER TABLE "ApiManagementGatewayLlmLog" RENAME TO "ApiManagementGatewayLlmLog_0003";

-- LIKE copies the columns in their order, NOT NULL, defaults (the RecordId sequence) and the lz4
-- compression of 0003; keys and indexes are added after the rows are in.
CREATE TABLE "GatehouseGatewayLogs" (LIKE "GatehouseGatewayLogs_0003" INCLUDING DEFAULTS INCLUDING COMPRESSION)
    PARTITION BY RANGE ("TimeGenerated");
CREATE TABLE "GatehouseCallContent" (LIKE "GatehouseCallContent_0003" INCLUDING DEFAULTS INCLUDING COMPRESSION)
    PARTITION BY RANGE ("TimeGenerated");
CREATE TABLE "GatehouseLlmLogHeaders" (LIKE "ApiManagementGatewayLlmLog_0003" INCLUDING DEFAULTS INCLUDING COMPRESSION)
    PARTITION BY RANGE ("TimeGenerated");
CREATE TABLE "GatehouseLlmLogPieces" (LIKE "ApiManagementGatewayLlmLog_0003" INCLUDING DEFAULTS INCLUDING COMPRESSION)
    PARTITION BY RANGE ("TimeGenerated");
-- The RecordId sequence now belongs to the new table, so that dropping the old one keeps it.
ALTER SEQUENCE "GatehouseGatewayLogs_RecordId_seq" OWNED BY "GatehouseGatewayLogs"."RecordId";

-- Each new partition takes a few locks until the migration commits, and PostgreSQL's lock table
-- is small (max_locks_per_transaction, 64 per connection by default): a store with a long history
-- gets day partitions from the first day of the previous month on, and one partition per calendar
-- month ("<table>_pYYYYMM") before that. Retention drops a month partition once the whole month
-- is past its cutoff.
DO $$
DECLARE
    parent text;
    day date;
    daily_from date := (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month')::date;
BEGIN
    FOREACH parent IN ARRAY ARRAY['GatehouseGatewayLogs', 'GatehouseCallContent', 'GatehouseLlmLogHeaders', 'GatehouseLlmLogPieces'] LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', parent || '_default', parent);
        FOR day IN
            WITH days AS (
                SELECT DISTINCT ("TimeGenerated" AT TIME ZONE 'UTC')::date AS held FROM "GatehouseGatewayLogs_0003"
                UNION SELECT DISTINCT ("TimeGenerated" AT TIME ZONE 'UTC')::date FROM "GatehouseCallContent_0003"
                UNION SELECT DISTINCT ("TimeGenerated" AT TIME ZONE 'UTC')::date FROM "ApiManagementGatewayLlmLog_0003"
            )
            SELECT DISTINCT CASE WHEN held >= daily_from THEN held ELSE date_trunc('month', held)::date END FROM days
        LOOP
            IF day >= daily_from THEN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    parent || '_p' || to_char(day, 'YYYYMMDD'),
                    parent,
                    to_char(day, 'YYYY-MM-DD') || ' 00:00:00+00',
                    to_char(day + 1, 'YYYY-MM-DD') || ' 00:00:00+00'
                );
            ELSE
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    parent || '_p' || to_char(day, 'YYYYMM'),
                    parent,
                    to_char(day, 'YYYY-MM-DD') || ' 00:00:00+00',
                    to_char((day + interval '1 month')::date, 'YYYY-MM-DD') || ' 00:00:00+00'
                );
            END IF;
        END LOOP;
    END LOOP;
END
$$;

INSERT INTO "GatehouseGatewayLogs" SELECT * FROM "GatehouseGatewayLogs_0003";
INSERT INTO "GatehouseCallContent" SELECT * FROM "GatehouseCallContent_0003";
INSERT INTO "GatehouseLlmLogHeaders" SELECT * FROM "ApiManagementGatewayLlmLog_0003" WHERE "SequenceNumber" = 0;
INSERT INTO "GatehouseLlmLogPieces" SELECT * FROM "ApiManagementGatewayLlmLog_0003" WHERE "SequenceNumber" > 0;

DROP TABLE "GatehouseGatewayLogs_0003";
DROP TABLE "GatehouseCallContent_0003";
DROP TABLE "ApiManagementGatewayLlmLog_0003";

ALTER TABLE "GatehouseGatewayLogs"
    ADD CONSTRAINT "GatehouseGatewayLogs_pkey" PRIMARY KEY ("RecordId", "TimeGenerated"),
    ADD CONSTRAINT "GatehouseGatewayLogs_Call" UNIQUE ("CorrelationId", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Time" ON "GatehouseGatewayLogs" ("TimeGenerated", "RecordId");
CREATE INDEX "GatehouseGatewayLogs_User" ON "GatehouseGatewayLogs" ("UserId", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_UserName" ON "GatehouseGatewayLogs" ("UserName", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_CallerKey" ON "GatehouseGatewayLogs" ("CallerIpKey", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Subscription" ON "GatehouseGatewayLogs" ("ApimSubscriptionId", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Chain" ON "GatehouseGatewayLogs" ("ChainId", "ChainSequence");

ALTER TABLE "GatehouseCallContent"
    ADD CONSTRAINT "GatehouseCallContent_pkey" PRIMARY KEY ("CorrelationId", "TimeGenerated");
CREATE INDEX "GatehouseCallContent_Time" ON "GatehouseCallContent" ("TimeGenerated");
CREATE INDEX "GatehouseCallContent_Search" ON "GatehouseCallContent" USING GIN ("SearchText");

ALTER TABLE "GatehouseLlmLogHeaders"
    ADD CONSTRAINT "GatehouseLlmLogHeaders_pkey" PRIMARY KEY ("CorrelationId", "SequenceNumber", "TimeGenerated"),
    ADD CONSTRAINT "GatehouseLlmLogHeaders_Header" CHECK ("SequenceNumber" = 0);
CREATE INDEX "GatehouseLlmLogHeaders_Time" ON "GatehouseLlmLogHeaders" ("TimeGenerated");

ALTER TABLE "GatehouseLlmLogPieces"
    ADD CONSTRAINT "GatehouseLlmLogPieces_pkey" PRIMARY KEY ("CorrelationId", "SequenceNumber", "TimeGenerated"),
    ADD CONSTRAINT "GatehouseLlmLogPieces_Piece" CHECK ("SequenceNumber" > 0);
CREATE INDEX "GatehouseLlmLogPieces_Time" ON "GatehouseLlmLogPieces" ("TimeGenerated");

-- The same join as before, on the whole key so that each side is read from the day's partition.
CREATE VIEW "ApiManagementGatewayLogs" AS
SELECT l.*, c."BackendRequestBody", c."BackendResponseBody"
FROM "GatehouseGatewayLogs" l
LEFT JOIN "GatehouseCallContent" c
    ON c."CorrelationId" = l."CorrelationId" AND c."TimeGenerated" = l."TimeGenerated";

CREATE VIEW "ApiManagementGatewayLlmLog" AS
SELECT "TimeGenerated", "CorrelationId", "OperationName", "DeploymentName", "ModelName", "ApiVersion",
       "IsStreamCompletion", "PromptTokens", "CompletionTokens", "TotalTokens", "SequenceNumber",
       "RequestMessages", "ResponseMessages"
FROM "GatehouseLlmLogHeaders"
UNION ALL
SELECT "TimeGenerated", "CorrelationId", "OperationName", "DeploymentName", "ModelName", "ApiVersion",
       "IsStreamCompletion", "PromptTokens", "CompletionTokens", "TotalTokens", "SequenceNumber",
       "RequestMessages", "ResponseMessages"
FROM "GatehouseLlmLogPieces";
