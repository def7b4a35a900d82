-- Conditions of the OAuth side an operator must see once, not per business:
-- the OAuth client refused, a token file refused while the stored chain is
-- kept, a rotated refresh token the token store could not take.
CREATE TABLE auth_alerts (
    alert_key TEXT PRIMARY KEY,   -- 'oauth-client', 'file-refused:<grant>', 'unsaved:<grant>'
    message   TEXT NOT NULL,
    since     TEXT NOT NULL
);
