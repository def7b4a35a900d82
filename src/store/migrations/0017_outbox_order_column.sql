-- leadsync schema, version 17: a negotiation's transitions go in the order
-- of their instants exactly (SPEC §4: by partner_status_changed_at, then id).
--
-- changed_at_utc is SQLite's reading of the instant, to the millisecond
-- (strftime's %f truncates): two rows within one millisecond
-- ('...00.0004Z', '...00.0001Z') went in id order. And SQLite reads a
-- fraction as one floating-point number: one of 309 digits read as no
-- fraction at all, and one of more than 309 as no time (refused as outside
-- the years 0000-9999). RFC 3339 bounds neither the digits nor the order.
--
-- changed_at_order: the whole seconds in UTC (SQLite's reading of the time
-- without its fraction, so exact), then the fraction's digits as given,
-- trailing zeros dropped ('.5', none for '.000'). Offsets are whole
-- minutes, so the given fraction is the UTC one; text order is time order
-- ('...:00' < '...:00.0001' < '...:00.0004' < '...:01'). NULL when SQLite
-- cannot read the time, like changed_at_utc: such a row fails alone.
ALTER TABLE outbox ADD COLUMN changed_at_order TEXT GENERATED ALWAYS AS
    (CASE WHEN typeof(partner_status_changed_at) = 'text'
           AND partner_status_changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]*'
          THEN strftime('%Y-%m-%dT%H:%M:%S',
                   substr(partner_status_changed_at, 1, 19)
                   || CASE WHEN substr(partner_status_changed_at, 20, 1) = '.'
                           THEN ltrim(substr(partner_status_changed_at, 21), '0123456789')
                           ELSE substr(partner_status_changed_at, 20) END)
               || CASE WHEN substr(partner_status_changed_at, 20, 1) = '.'
                       THEN rtrim('.' || substr(partner_status_changed_at, 21,
                                    length(substr(partner_status_changed_at, 21))
                                    - length(ltrim(substr(partner_status_changed_at, 21), '0123456789'))),
                                  '.0')
                       ELSE '' END
     END) VIRTUAL;
