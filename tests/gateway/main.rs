#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests may panic
//! imapgate's integration tests: one binary, one shared real Dovecot, suites named by threat
//! or capability. Every test talks to a gateway over loopback on ports chosen at run time.
//! With `IMAPGATE_REQUIRE_REAL=1`, a missing real component (Dovecot, curl, python3) fails.

mod harness;
mod pg;

mod admin_http;
mod api;
mod approval;
mod audit;
mod backends_mail;
mod clients;
mod config_files;
mod faulty_upstream;
mod guard;
mod hostile;
mod login;
mod logins;
mod mail_fronts;
mod metrics;
mod mfa;
mod oauth;
mod operations;
mod portal;
mod preauth_input;
mod relay;
mod sessions;
mod shared_state;
mod shutdown;
mod store;
mod systemd_notify;
mod tls_front;
mod upstream;
