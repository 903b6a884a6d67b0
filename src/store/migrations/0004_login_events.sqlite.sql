-- Schema 4: each user's recent logins, successful and failed (the portal's "recent activity"),
-- written by the gateway in the background (store::activity). Bounded by the writer: at most
-- LOGIN_HISTORY_PER_USER rows per user and none older than LOGIN_HISTORY_KEPT. Rows only for
-- users the store lists, deleted with the user. `seq` orders logins of the same second.
CREATE TABLE login_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_name TEXT NOT NULL,
    at BIGINT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    listener TEXT NOT NULL DEFAULT '',
    mechanism TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    credential TEXT NOT NULL DEFAULT ''
);
CREATE INDEX login_events_user_at ON login_events (user_name, at);
CREATE INDEX login_events_at ON login_events (at);
