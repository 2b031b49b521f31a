-- Gatehouse audit store, SQLite. Column names are Azure Monitor's (ApiManagementGatewayLogs,
-- ApiManagementGatewayLlmLog) so that queries written for them read the same here.

-- One row per call: metadata only. Bodies live in GatehouseCallContent.
CREATE TABLE GatehouseGatewayLogs (
    RecordId              INTEGER PRIMARY KEY,
    TimeGenerated         TEXT    NOT NULL, -- RFC 3339 UTC, sortable
    CorrelationId         TEXT    NOT NULL UNIQUE,
    OperationName         TEXT    NOT NULL,
    Category              TEXT    NOT NULL,
    GatewayId             TEXT    NOT NULL,
    OperationId           TEXT    NOT NULL,
    CallerIpAddress       TEXT    NOT NULL,
    CallerIpKey           TEXT    NOT NULL, -- 32 hex digits of the IPv6(-mapped) address, for CIDR ranges
    PeerIpAddress         TEXT    NOT NULL,
    Method                TEXT    NOT NULL,
    Url                   TEXT    NOT NULL,
    ClientProtocol        TEXT    NOT NULL,
    ResponseCode          INTEGER NOT NULL,
    IsRequestSuccess      INTEGER NOT NULL,
    BackendResponseCode   INTEGER,
    BackendId             TEXT,
    BackendUrl            TEXT,
    RequestSize           INTEGER NOT NULL,
    ResponseSize          INTEGER NOT NULL,
    TotalTime             INTEGER NOT NULL,
    BackendTime           INTEGER NOT NULL,
    TimeToFirstByte       INTEGER,
    ApimSubscriptionId    TEXT,
    ProductId             TEXT,
    UserId                TEXT,
    UserName              TEXT,
    EntraTenantId         TEXT,
    Groups                TEXT    NOT NULL,
    DeploymentName        TEXT,
    ModelName             TEXT,
    ApiVersion            TEXT,
    IsStreamCompletion    INTEGER NOT NULL,
    PromptTokens          INTEGER,
    CompletionTokens      INTEGER,
    TotalTokens           INTEGER,
    CachedTokens          INTEGER,
    ReasoningTokens       INTEGER,
    TokensEstimated       INTEGER NOT NULL,
    Attempts              TEXT    NOT NULL,
    AttemptCount          INTEGER NOT NULL,
    RequestBodyTruncated  INTEGER NOT NULL,
    ResponseBodyTruncated INTEGER NOT NULL,
    ClientAborted         INTEGER NOT NULL,
    LastErrorReason       TEXT,
    LastErrorMessage      TEXT,
    ChainId               TEXT,
    ChainSequence         INTEGER,
    PreviousHash          TEXT,
    RecordHash            TEXT,
    ContentHash           TEXT
);
CREATE INDEX GatehouseGatewayLogs_Time ON GatehouseGatewayLogs (TimeGenerated, RecordId);
CREATE INDEX GatehouseGatewayLogs_User ON GatehouseGatewayLogs (UserId, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_UserName ON GatehouseGatewayLogs (UserName, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_Caller ON GatehouseGatewayLogs (CallerIpAddress, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_CallerKey ON GatehouseGatewayLogs (CallerIpKey, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_Subscription ON GatehouseGatewayLogs (ApimSubscriptionId, TimeGenerated);
CREATE INDEX GatehouseGatewayLogs_Chain ON GatehouseGatewayLogs (ChainId, ChainSequence);

-- Request and response bodies, apart from the metadata so that they can expire first.
CREATE TABLE GatehouseCallContent (
    CorrelationId       TEXT PRIMARY KEY,
    TimeGenerated       TEXT NOT NULL,
    BackendRequestBody  TEXT,
    BackendResponseBody TEXT
);
CREATE INDEX GatehouseCallContent_Time ON GatehouseCallContent (TimeGenerated);

-- Azure's LLM log: a header row (SequenceNumber 0) and prompt/completion pieces of <= 32 KB.
CREATE TABLE ApiManagementGatewayLlmLog (
    TimeGenerated      TEXT    NOT NULL,
    CorrelationId      TEXT    NOT NULL,
    OperationName      TEXT    NOT NULL,
    DeploymentName     TEXT    NOT NULL,
    ModelName          TEXT    NOT NULL,
    ApiVersion         TEXT    NOT NULL,
    IsStreamCompletion INTEGER NOT NULL,
    PromptTokens       INTEGER,
    CompletionTokens   INTEGER,
    TotalTokens        INTEGER,
    SequenceNumber     INTEGER NOT NULL,
    RequestMessages    TEXT,
    ResponseMessages   TEXT,
    PRIMARY KEY (CorrelationId, SequenceNumber)
);
CREATE INDEX ApiManagementGatewayLlmLog_Time ON ApiManagementGatewayLlmLog (TimeGenerated);
CREATE INDEX ApiManagementGatewayLlmLog_Pieces ON ApiManagementGatewayLlmLog (TimeGenerated) WHERE SequenceNumber > 0;

-- Azure's gateway log, as a view: metadata joined with its content.
CREATE VIEW ApiManagementGatewayLogs AS
SELECT l.*, c.BackendRequestBody, c.BackendResponseBody
FROM GatehouseGatewayLogs l
LEFT JOIN GatehouseCallContent c ON c.CorrelationId = l.CorrelationId;

-- Full text of prompts and completions (FTS5), one row per call.
CREATE VIRTUAL TABLE GatehouseContentSearch USING fts5 (
    CorrelationId UNINDEXED,
    Prompt,
    Completion,
    tokenize = 'unicode61 remove_diacritics 2'
);

-- Pre-aggregated usage for dashboards, maintained as records are written.
CREATE TABLE GatehouseUsageRollup (
    Granularity      TEXT    NOT NULL, -- 'minute' | 'hour'
    Bucket           TEXT    NOT NULL, -- RFC 3339 start of the bucket
    Dimension        TEXT    NOT NULL, -- 'all', 'model', 'deployment', 'operation', 'subscription', 'user', 'group', 'caller_ip', 'backend', 'status_class'
    DimensionValue   TEXT    NOT NULL,
    Requests         INTEGER NOT NULL,
    Errors           INTEGER NOT NULL,
    PromptTokens     INTEGER NOT NULL,
    CompletionTokens INTEGER NOT NULL,
    TotalTokens      INTEGER NOT NULL,
    LatencySumMs     INTEGER NOT NULL,
    LatencyMaxMs     INTEGER NOT NULL,
    PRIMARY KEY (Granularity, Dimension, Bucket, DimensionValue)
);
