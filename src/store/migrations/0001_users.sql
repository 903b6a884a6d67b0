-- imapgate credential store, schema 1: users and their app passwords. Times are Unix seconds.
-- Flags are 0/1 integers (sqlx's Any driver reads no SQLite booleans).
CREATE TABLE users (
    name TEXT PRIMARY KEY NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    mfa TEXT,
    mechanisms TEXT NOT NULL DEFAULT '',
    allowed_networks TEXT NOT NULL DEFAULT '',
    totp TEXT,
    upstream_user TEXT,
    created BIGINT NOT NULL,
    updated BIGINT NOT NULL
);

CREATE TABLE app_passwords (
    user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL,
    lookup TEXT,
    created BIGINT NOT NULL,
    expires BIGINT,
    revoked BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_name, id)
);
