-- Time to first token: milliseconds from a streamed call's arrival to the first generated output
-- sent to its client (its first event that carries output, not Azure's opening prompt-filter
-- event). NULL for answers sent whole, for calls written before this column, and for streams
-- that sent no output.
-- The ApiManagementGatewayLogs view selects l.*, which SQLite expands when the view is read, so
-- it shows the new column without being made again.
ALTER TABLE GatehouseGatewayLogs ADD COLUMN TimeToFirstToken INTEGER;
