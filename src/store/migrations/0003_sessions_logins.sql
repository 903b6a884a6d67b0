-- Schema 3: the session directory (each replica mirrors its relayed sessions here and renews
-- `seen` every heartbeat; rows not renewed in time belong to a replica that is gone and are
-- ignored and deleted), and each user's last login (app passwords: app_password_usage).
CREATE TABLE sessions (
    id TEXT PRIMARY KEY NOT NULL,
    replica TEXT NOT NULL,
    user_name TEXT NOT NULL,
    credential TEXT NOT NULL DEFAULT '',
    client_address TEXT NOT NULL DEFAULT '',
    client_name TEXT,
    client_version TEXT,
    listener TEXT NOT NULL DEFAULT '',
    since BIGINT NOT NULL,
    seen BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_name);
CREATE INDEX sessions_replica ON sessions (replica);

CREATE TABLE user_logins (
    user_name TEXT PRIMARY KEY NOT NULL,
    last_login BIGINT NOT NULL,
    last_address TEXT NOT NULL DEFAULT '',
    last_client TEXT NOT NULL DEFAULT '',
    last_credential TEXT NOT NULL DEFAULT ''
);
