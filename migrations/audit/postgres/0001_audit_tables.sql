-- Gatehouse audit store, PostgreSQL. Column names are Azure Monitor's (ApiManagementGatewayLogs,
-- ApiManagementGatewayLlmLog), quoted so that their case is kept.

CREATE TABLE "GatehouseGatewayLogs" (
    "RecordId"              BIGSERIAL PRIMARY KEY,
    "TimeGenerated"         TIMESTAMPTZ NOT NULL,
    "CorrelationId"         TEXT        NOT NULL UNIQUE,
    "OperationName"         TEXT        NOT NULL,
    "Category"              TEXT        NOT NULL,
    "GatewayId"             TEXT        NOT NULL,
    "OperationId"           TEXT        NOT NULL,
    "CallerIpAddress"       TEXT        NOT NULL,
    "CallerIpKey"           TEXT        NOT NULL,
    "PeerIpAddress"         TEXT        NOT NULL,
    "Method"                TEXT        NOT NULL,
    "Url"                   TEXT        NOT NULL,
    "ClientProtocol"        TEXT        NOT NULL,
    "ResponseCode"          INTEGER     NOT NULL,
    "IsRequestSuccess"      BOOLEAN     NOT NULL,
    "BackendResponseCode"   INTEGER,
    "BackendId"             TEXT,
    "BackendUrl"            TEXT,
    "RequestSize"           BIGINT      NOT NULL,
    "ResponseSize"          BIGINT      NOT NULL,
    "TotalTime"             BIGINT      NOT NULL,
    "BackendTime"           BIGINT      NOT NULL,
    "TimeToFirstByte"       BIGINT,
    "ApimSubscriptionId"    TEXT,
    "ProductId"             TEXT,
    "UserId"                TEXT,
    "UserName"              TEXT,
    "EntraTenantId"         TEXT,
    "Groups"                JSONB       NOT NULL,
    "DeploymentName"        TEXT,
    "ModelName"             TEXT,
    "ApiVersion"            TEXT,
    "IsStreamCompletion"    BOOLEAN     NOT NULL,
    "PromptTokens"          BIGINT,
    "CompletionTokens"      BIGINT,
    "TotalTokens"           BIGINT,
    "CachedTokens"          BIGINT,
    "ReasoningTokens"       BIGINT,
    "TokensEstimated"       BOOLEAN     NOT NULL,
    "Attempts"              JSONB       NOT NULL,
    "AttemptCount"          INTEGER     NOT NULL,
    "RequestBodyTruncated"  BOOLEAN     NOT NULL,
    "ResponseBodyTruncated" BOOLEAN     NOT NULL,
    "ClientAborted"         BOOLEAN     NOT NULL,
    "LastErrorReason"       TEXT,
    "LastErrorMessage"      TEXT,
    "ChainId"               TEXT,
    "ChainSequence"         BIGINT,
    "PreviousHash"          TEXT,
    "RecordHash"            TEXT,
    "ContentHash"           TEXT
);
CREATE INDEX "GatehouseGatewayLogs_Time" ON "GatehouseGatewayLogs" ("TimeGenerated", "RecordId");
CREATE INDEX "GatehouseGatewayLogs_User" ON "GatehouseGatewayLogs" ("UserId", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_UserName" ON "GatehouseGatewayLogs" ("UserName", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Caller" ON "GatehouseGatewayLogs" ("CallerIpAddress", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_CallerKey" ON "GatehouseGatewayLogs" ("CallerIpKey", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Subscription" ON "GatehouseGatewayLogs" ("ApimSubscriptionId", "TimeGenerated");
CREATE INDEX "GatehouseGatewayLogs_Chain" ON "GatehouseGatewayLogs" ("ChainId", "ChainSequence");

-- Bodies apart from metadata; TOAST compresses them (lz4 where the server has it).
CREATE TABLE "GatehouseCallContent" (
    "CorrelationId"       TEXT PRIMARY KEY,
    "TimeGenerated"       TIMESTAMPTZ NOT NULL,
    "BackendRequestBody"  TEXT,
    "BackendResponseBody" TEXT,
    "SearchText"          TSVECTOR
);
CREATE INDEX "GatehouseCallContent_Time" ON "GatehouseCallContent" ("TimeGenerated");
CREATE INDEX "GatehouseCallContent_Search" ON "GatehouseCallContent" USING GIN ("SearchText");

CREATE TABLE "ApiManagementGatewayLlmLog" (
    "TimeGenerated"      TIMESTAMPTZ NOT NULL,
    "CorrelationId"      TEXT        NOT NULL,
    "OperationName"      TEXT        NOT NULL,
    "DeploymentName"     TEXT        NOT NULL,
    "ModelName"          TEXT        NOT NULL,
    "ApiVersion"         TEXT        NOT NULL,
    "IsStreamCompletion" BOOLEAN     NOT NULL,
    "PromptTokens"       BIGINT,
    "CompletionTokens"   BIGINT,
    "TotalTokens"        BIGINT,
    "SequenceNumber"     INTEGER     NOT NULL,
    "RequestMessages"    TEXT,
    "ResponseMessages"   TEXT,
    PRIMARY KEY ("CorrelationId", "SequenceNumber")
);
CREATE INDEX "ApiManagementGatewayLlmLog_Time" ON "ApiManagementGatewayLlmLog" ("TimeGenerated");
CREATE INDEX "ApiManagementGatewayLlmLog_Pieces" ON "ApiManagementGatewayLlmLog" ("TimeGenerated") WHERE "SequenceNumber" > 0;

CREATE VIEW "ApiManagementGatewayLogs" AS
SELECT l.*, c."BackendRequestBody", c."BackendResponseBody"
FROM "GatehouseGatewayLogs" l
LEFT JOIN "GatehouseCallContent" c ON c."CorrelationId" = l."CorrelationId";

CREATE TABLE "GatehouseUsageRollup" (
    "Granularity"      TEXT        NOT NULL,
    "Bucket"           TIMESTAMPTZ NOT NULL,
    "Dimension"        TEXT        NOT NULL,
    "DimensionValue"   TEXT        NOT NULL,
    "Requests"         BIGINT      NOT NULL,
    "Errors"           BIGINT      NOT NULL,
    "PromptTokens"     BIGINT      NOT NULL,
    "CompletionTokens" BIGINT      NOT NULL,
    "TotalTokens"      BIGINT      NOT NULL,
    "LatencySumMs"     BIGINT      NOT NULL,
    "LatencyMaxMs"     BIGINT      NOT NULL,
    PRIMARY KEY ("Granularity", "Dimension", "Bucket", "DimensionValue")
);
