-- Time to first token: milliseconds from a streamed call's arrival to the first generated output
-- sent to its client (its first event that carries output, not Azure's opening prompt-filter
-- event). NULL for answers sent whole, for calls written before this column, and for streams
-- that sent no output. Adding a nullable column without a default changes no row, so it takes
-- no time on a large table.
ALTER TABLE "GatehouseGatewayLogs" ADD COLUMN "TimeToFirstToken" BIGINT;

-- PostgreSQL expanded the view's l.* when the view was made, so it is made again to show the
-- column (CREATE OR REPLACE cannot: the column comes before the bodies). The privileges granted
-- on it (an auditors' role given SELECT, say) are given again as they were; a view an operator
-- built on this one makes the DROP fail, and the migration with it, rather than go unnoticed.
DO $$
DECLARE
    grants text[];
    statement text;
BEGIN
    SELECT coalesce(array_agg(format('GRANT %s ON "ApiManagementGatewayLogs" TO %s%s',
               privilege_type,
               CASE WHEN grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(grantee) END,
               CASE WHEN is_grantable = 'YES' THEN ' WITH GRANT OPTION' ELSE '' END)), '{}')
      INTO grants
      FROM information_schema.role_table_grants
     WHERE table_schema = current_schema()
       AND table_name = 'ApiManagementGatewayLogs'
       AND grantee <> current_user;

    DROP VIEW "ApiManagementGatewayLogs";
    CREATE VIEW "ApiManagementGatewayLogs" AS
    SELECT l.*, c."BackendRequestBody", c."BackendResponseBody"
    FROM "GatehouseGatewayLogs" l
    LEFT JOIN "GatehouseCallContent" c
        ON c."CorrelationId" = l."CorrelationId" AND c."TimeGenerated" = l."TimeGenerated";

    FOREACH statement IN ARRAY grants LOOP
        EXECUTE statement;
    END LOOP;
END
$$;
