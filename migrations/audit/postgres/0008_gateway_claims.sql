-- Which running gateway holds each gateway_id (docs/audit.md, "Each gateway needs its own
-- gateway_id"). A gateway claims its id when it starts and renews the claim while it runs; a
-- gateway that finds its id held by another one that is alive refuses to start, instead of
-- forking that id's audit chains. Times are Unix milliseconds of the gateways' clocks.
CREATE TABLE "GatehouseGatewayClaims" (
    "GatewayId"   text   NOT NULL PRIMARY KEY,
    "InstanceId"  text   NOT NULL, -- random, kept in the gateway's state_dir across restarts
    "Host"        text   NOT NULL,
    "ClaimedAtMs" bigint NOT NULL,
    "SeenAtMs"    bigint NOT NULL  -- the last renewal
);
