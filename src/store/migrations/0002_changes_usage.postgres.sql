-- Schema 2: the change log every replica follows (revocations end sessions everywhere), and
-- when and from where each app password was last used.
CREATE TABLE changes (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    user_name TEXT NOT NULL,
    credential TEXT NOT NULL DEFAULT ''
);
CREATE INDEX changes_at ON changes (at);

CREATE TABLE app_password_usage (
    user_name TEXT NOT NULL,
    id TEXT NOT NULL,
    last_used BIGINT NOT NULL,
    last_address TEXT NOT NULL DEFAULT '',
    last_client TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user_name, id)
);
