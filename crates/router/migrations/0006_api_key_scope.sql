-- API key scopes (SPEC §8): `admin` keys (all keys made before) reach the admin API by their role and `/v1`;
-- `inference` keys reach `/v1` only: the key to hand to applications.
ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin' CHECK (scope IN ('admin', 'inference'));
