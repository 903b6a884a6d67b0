//! imapgate: a security gateway in front of legacy IMAP servers.
//!
//! It terminates TLS, refuses every cleartext login, authenticates users with gateway-issued
//! app passwords, then logs into the unmodified backend as the user (master user or SASL
//! authzid) and relays the session byte for byte.
//!
//! Layout (one room per concern; DESIGN.md has the map):
//! - `cli`: operator commands (`run`, `check-config`, `users`, `app-password`).
//! - `config`: YAML schema, validation into typed values, secrets from files/env.
//! - `server`: listeners, admission caps, accept loop, shutdown/drain.
//! - `tls`: client-facing rustls config (SNI, ALPN policy), backend TLS, the `Conn` stream.
//! - `imap`: bounded framing, imap-codec decoding, encoded replies.
//! - `session`: per-connection driver; the pre-auth state machine; the relay.
//! - `login`: one login attempt from credential to a ready backend session (guard → check →
//!   record → delay → per-user slot → route → upstream login), with its one audit record.
//! - `net`: which addresses count as one client network or source.
//! - `auth`: the `Authenticator` seam, users file, app passwords (argon2id), SASL PLAIN.
//! - `guard`: the decision before every credential check (brute-force defence seam).
//! - `state`: the shared `Store` (memory now; Redis later).
//! - `upstream`: routing, backend connect and login state machine, health probes.
//! - `observe`: metrics, audit log, logging, admin HTTP.
//! - `secret`: the redacting, zeroizing `Secret` type.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod guard;
pub mod imap;
pub mod login;
pub mod net;
pub mod observe;
pub mod portal;
pub mod secret;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod tls;
pub mod upstream;
