-- leadsync schema, version 10: writing a change row no longer builds two
-- temporary tables. SQLite evaluates `kind IN (three or more constants)` by
-- filling an ephemeral table, once per statement run, i.e. per change row:
-- the CHECK on `kind` and the predicate of negotiation_changes_news_by_business
-- cost ~15% of a first full sync's CPU (README, "Performance"). The table was
-- rebuilt before this script (store::rebuild_negotiation_changes) with the same
-- columns, rows and ids and the same CHECK written with OR; here its indexes
-- are put back, the news index with the equivalent `kind <> 'missing'` (the
-- CHECK allows four kinds: new, changed, missing, reappeared).
CREATE INDEX IF NOT EXISTS negotiation_changes_by_negotiation ON negotiation_changes (negotiation_id, id)
    WHERE kind <> 'new';
DROP INDEX IF EXISTS negotiation_changes_news_by_business;
CREATE INDEX negotiation_changes_news_by_business ON negotiation_changes (business_id, id)
    WHERE kind <> 'missing';
