-- A detailed sample of the full-text vector (10,000 most common lexemes instead of 1,000), so that
-- the planner estimates a rare search term (an invoice number, a ticket id) as rare and asks the
-- full-text index for its few calls. With the default sample every lexeme outside the list was
-- taken to match about 0.5 % of a day's calls, and on 10 million calls a search for one invoice
-- number scanned every call of the week (1.1 s instead of 11 ms; bench/README.md). Setting it on
-- the parent sets it on the partitions that exist; the store copies it to each partition it
-- creates later (`partitions::copy_statistics_targets`).
ALTER TABLE "GatehouseCallContent" ALTER COLUMN "SearchText" SET STATISTICS 1000;
