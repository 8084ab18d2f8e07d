-- 0013 Real attestation (src/store/attestation.rs): a graded state with the
-- environment evidence the platform reported, the provider and the time of
-- the verdict (a verified state decays to `unknown` after the configured
-- maximum age), and the App Attest key of each iOS device with its counter
-- and Apple's receipt. `attestation_state` stays as the verdict's summary
-- (`verified` for every passing grade), written with the grade.
ALTER TABLE devices ADD COLUMN attestation_grade TEXT NOT NULL DEFAULT 'unknown'
    CHECK (attestation_grade IN ('unknown', 'strong', 'device', 'basic', 'failed'));
ALTER TABLE devices ADD COLUMN attestation_evidence TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN attestation_provider TEXT;
ALTER TABLE devices ADD COLUMN attested_at TIMESTAMPTZ;
-- Verdicts recorded before grades existed came from the `test` provider,
-- which grades a pass as `device`.
UPDATE devices SET attestation_grade = 'device', attestation_provider = 'test',
    attested_at = updated_at WHERE attestation_state = 'verified';
UPDATE devices SET attestation_grade = 'failed', attestation_provider = 'test',
    attested_at = updated_at WHERE attestation_state = 'failed';

CREATE TABLE app_attest_keys (
    device_id  TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    key_id     BYTEA NOT NULL CHECK (octet_length(key_id) = 32),
    public_key BYTEA NOT NULL CHECK (octet_length(public_key) = 65),
    counter    BIGINT NOT NULL CHECK (counter BETWEEN 0 AND 4294967295),
    receipt    BYTEA NOT NULL,
    app_id     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
