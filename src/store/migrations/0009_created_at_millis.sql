-- leadsync schema, version 9: `negotiations.created_at` with milliseconds,
-- as every other leadsync timestamp, so that text order is time order (a
-- whole second "…:00Z" sorted after "…:00.500Z" of the same second). Rows
-- written before kept the precision the lead was sent with; new ones get
-- ".000Z" at least. Only the column changes: payloads are untouched.
UPDATE negotiations SET created_at = substr(created_at, 1, 19) || '.000Z'
 WHERE created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z';
