-- Time to first token: milliseconds from a call's arrival to the first generated output sent to
-- its client (a stream's first event that carries output, not Azure's opening prompt-filter
-- event; an answer sent whole that reports completion tokens, its first byte). NULL for calls
-- written before this column, and for calls that sent no output.
-- The ApiManagementGatewayLogs view selects l.*, which SQLite expands when the view is read, so
-- it shows the new column without being made again.
ALTER TABLE GatehouseGatewayLogs ADD COLUMN TimeToFirstToken INTEGER;
