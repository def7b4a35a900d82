-- leadsync schema, version 2: both published lead shapes, and the
-- pagination style of each sync pass (SPEC §3, §5).
--
-- Convenience columns take the first present of (SPEC §5):
--   category        request.category.name, category.name
--   customer_name   customer.displayName, customer.firstName || ' ' || customer.lastName
--   city, zip       request.location.city/zipCode, customer.location.city/zipCode
--   customer_phone  customer.phone
--   lead_price      leadPrice, the text as sent ("$25.00"), never a float
--   charge_state    chargeState
-- Rows mirrored before this version are back-filled from their payload, so
-- that a lead in the NegotiationV4 shape has its columns without waiting for
-- its payload to change.

ALTER TABLE negotiations ADD COLUMN customer_phone TEXT;
ALTER TABLE negotiations ADD COLUMN lead_price TEXT;
ALTER TABLE negotiations ADD COLUMN charge_state TEXT;
ALTER TABLE sync_runs ADD COLUMN pagination TEXT
    CHECK (pagination IN ('next', 'token', 'offset', 'single'));

-- A JSON string (not empty) or number as text; NULL for anything else.
CREATE TEMP VIEW leadsync_v2_fields AS
SELECT negotiation_id,
       CASE WHEN json_type(payload, '$.request.category.name') = 'text'
            THEN NULLIF(json_extract(payload, '$.request.category.name'), '') END AS request_category,
       CASE WHEN json_type(payload, '$.category.name') = 'text'
            THEN NULLIF(json_extract(payload, '$.category.name'), '') END AS docs_category,
       CASE WHEN json_type(payload, '$.customer.displayName') = 'text'
            THEN NULLIF(json_extract(payload, '$.customer.displayName'), '') END AS display_name,
       CASE WHEN json_type(payload, '$.customer.firstName') = 'text'
            THEN NULLIF(trim(json_extract(payload, '$.customer.firstName')), '') END AS first_name,
       CASE WHEN json_type(payload, '$.customer.lastName') = 'text'
            THEN NULLIF(trim(json_extract(payload, '$.customer.lastName')), '') END AS last_name,
       CASE json_type(payload, '$.request.location.city')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.request.location.city'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.request.location.city') AS TEXT) END AS request_city,
       CASE json_type(payload, '$.customer.location.city')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.customer.location.city'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.customer.location.city') AS TEXT) END AS customer_city,
       CASE json_type(payload, '$.request.location.zipCode')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.request.location.zipCode'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.request.location.zipCode') AS TEXT) END AS request_zip,
       CASE json_type(payload, '$.customer.location.zipCode')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.customer.location.zipCode'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.customer.location.zipCode') AS TEXT) END AS customer_zip,
       CASE json_type(payload, '$.customer.phone')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.customer.phone'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.customer.phone') AS TEXT) END AS phone,
       CASE json_type(payload, '$.leadPrice')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.leadPrice'), '')
            WHEN 'integer' THEN CAST(json_extract(payload, '$.leadPrice') AS TEXT)
            WHEN 'real' THEN CAST(json_extract(payload, '$.leadPrice') AS TEXT) END AS price,
       CASE json_type(payload, '$.chargeState')
            WHEN 'text' THEN NULLIF(json_extract(payload, '$.chargeState'), '') END AS charge
  FROM negotiations
 WHERE json_valid(payload);

UPDATE negotiations
   SET category = COALESCE(f.request_category, f.docs_category),
       customer_name = COALESCE(f.display_name,
           CASE WHEN f.first_name IS NOT NULL OR f.last_name IS NOT NULL
                THEN trim(COALESCE(f.first_name, '') || ' ' || COALESCE(f.last_name, '')) END),
       city = COALESCE(f.request_city, f.customer_city),
       zip = COALESCE(f.request_zip, f.customer_zip),
       customer_phone = f.phone,
       lead_price = f.price,
       charge_state = f.charge
  FROM leadsync_v2_fields AS f
 WHERE f.negotiation_id = negotiations.negotiation_id;

DROP VIEW leadsync_v2_fields;
