//! systemd service notifications (`Type=notify`): the `sd_notify(3)` datagram protocol, written
//! here so no C library and no `unsafe` is needed.
//!
//! Protocol (sd_notify(3), "Description"): the service manager puts the address of a datagram
//! socket in `$NOTIFY_SOCKET`; the service sends newline-separated `KEY=VALUE` assignments to
//! it, one datagram per state change. An address starting with `/` is a file-system socket, one
//! starting with `@` names a socket in Linux's abstract namespace (the `@` stands for the leading
//! NUL byte). Without `$NOTIFY_SOCKET` every call is a no-op, so the gateway behaves the same
//! under Docker, Kubernetes or a shell.
//!
//! What the gateway sends (`server::Gateway` decides when):
//! - `READY=1` once every listener is bound and the admin listener serves, with
//!   `STATUS=serving N listeners …`;
//! - `RELOADING=1` with `MONOTONIC_USEC=` (CLOCK_MONOTONIC in µs, sd_notify(3) "MONOTONIC_USEC=",
//!   which systemd ≥ 253 uses for `Type=notify-reload`) when a SIGHUP reload begins, then
//!   `READY=1` with the outcome in `STATUS=` when it ends;
//! - `STOPPING=1` when draining starts, and `STATUS=` lines while it drains.
//!
//! Invariants: a notification never blocks the gateway for long (a send timeout of
//! [`SEND_TIMEOUT`]); a failed send is logged once per kind of failure and never stops the
//! gateway; a `STATUS=` text is one line (newlines become spaces) and carries counts and
//! listener names only, never a secret. Limits: datagrams are small (a few hundred bytes).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The longest a notification may block the caller (the manager's socket buffer is full).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The environment variable the service manager sets (sd_notify(3)).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET must be an absolute path or start with @ (got {0:?})")]
    Address(String),
    #[error("NOTIFY_SOCKET: abstract socket addresses are supported on Linux only")]
    AbstractUnsupported,
    #[error("NOTIFY_SOCKET: {0}")]
    Socket(std::io::Error),
}

/// Sends service notifications to the manager named by `$NOTIFY_SOCKET`, or does nothing.
#[derive(Debug, Default)]
pub struct Notifier {
    #[cfg(unix)]
    target: Option<Target>,
    /// A send failed once already (later failures are not logged again).
    failed: AtomicBool,
}

#[cfg(unix)]
#[derive(Debug)]
struct Target {
    socket: std::os::unix::net::UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    /// As given in `$NOTIFY_SOCKET`, for log lines.
    name: String,
}

impl Notifier {
    /// A notifier that sends nothing (no service manager is listening).
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From `$NOTIFY_SOCKET`: disabled when it is unset or empty, and (with a warning) when it
    /// names an address this module cannot use.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os(NOTIFY_SOCKET) else {
            return Notifier::disabled();
        };
        match Notifier::connect(&value) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "systemd notifications are off");
                Notifier::disabled()
            }
        }
    }

    /// A notifier for this `$NOTIFY_SOCKET` value; an empty value disables it.
    #[cfg(unix)]
    pub fn connect(value: &OsStr) -> Result<Notifier, NotifyError> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};

        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            None => return Ok(Notifier::disabled()),
            Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value))
                .map_err(NotifyError::Socket)?,
            Some(b'@') => abstract_addr(bytes.get(1..).unwrap_or_default())?,
            Some(_) => {
                return Err(NotifyError::Address(value.to_string_lossy().into_owned()));
            }
        };
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some(Target {
                socket,
                addr,
                name: value.to_string_lossy().into_owned(),
            }),
            failed: AtomicBool::new(false),
        })
    }

    /// Not on Unix: never a service manager to tell.
    #[cfg(not(unix))]
    pub fn connect(_value: &OsStr) -> Result<Notifier, NotifyError> {
        Ok(Notifier::disabled())
    }

    /// True when notifications go somewhere.
    pub fn is_enabled(&self) -> bool {
        #[cfg(unix)]
        {
            self.target.is_some()
        }
        #[cfg(not(unix))]
        {
            false
        }
    }

    /// Start-up (or a reload) is complete: `READY=1` and a status line.
    pub fn ready(&self, status: &str) {
        self.send(&["READY=1".to_owned(), status_line(status)]);
    }

    /// A reload begins: `RELOADING=1`, `MONOTONIC_USEC=` now, and a status line.
    pub fn reloading(&self, status: &str) {
        let mut lines = vec!["RELOADING=1".to_owned()];
        if let Some(usec) = monotonic_usec() {
            lines.push(format!("MONOTONIC_USEC={usec}"));
        }
        lines.push(status_line(status));
        self.send(&lines);
    }

    /// Draining begins: `STOPPING=1` and a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&["STOPPING=1".to_owned(), status_line(status)]);
    }

    /// A status line only (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&[status_line(status)]);
    }

    #[cfg(unix)]
    fn send(&self, lines: &[String]) {
        let Some(t) = &self.target else {
            return;
        };
        let mut message = lines.join("\n");
        message.push('\n');
        if let Err(e) = t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(socket = %t.name, error = %e, "cannot send a systemd notification");
            }
        }
    }

    #[cfg(not(unix))]
    fn send(&self, _lines: &[String]) {
        let _ = &self.failed;
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> Result<std::os::unix::net::SocketAddr, NotifyError> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(NotifyError::Socket)
}

#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn abstract_addr(_name: &[u8]) -> Result<std::os::unix::net::SocketAddr, NotifyError> {
    Err(NotifyError::AbstractUnsupported)
}

/// `STATUS=` with the text on one line (a newline would start a new assignment).
fn status_line(status: &str) -> String {
    let one_line: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("STATUS={one_line}")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC=` with.
pub fn monotonic_usec() -> Option<u64> {
    #[cfg(unix)]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let secs = u64::try_from(now.tv_sec).ok()?;
        let micros = u64::try_from(now.tv_nsec).ok()? / 1_000;
        secs.checked_mul(1_000_000)?.checked_add(micros)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn path_socket_gets_each_state_as_one_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        assert!(n.is_enabled());

        n.ready("serving 2 listeners");
        assert_eq!(receive(&sock), "READY=1\nSTATUS=serving 2 listeners\n");

        let before = monotonic_usec().unwrap();
        n.reloading("reloading");
        let after = monotonic_usec().unwrap();
        let msg = receive(&sock);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines[0], "RELOADING=1", "{msg}");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(before <= usec && usec <= after, "{before} {usec} {after}");
        assert_eq!(lines[2], "STATUS=reloading");

        n.stopping("draining");
        assert_eq!(receive(&sock), "STOPPING=1\nSTATUS=draining\n");
    }

    #[test]
    fn a_status_text_cannot_inject_an_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        n.status("listener a\nREADY=1\r\n");
        assert_eq!(receive(&sock), "STATUS=listener a READY=1  \n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names_start_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("imapgate-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        n.ready("up");
        assert_eq!(receive(&sock), "READY=1\nSTATUS=up\n");
    }

    #[test]
    fn unusable_values_are_refused_or_ignored() {
        // Empty: no manager (sd_notify(3) treats it as unset).
        assert!(!Notifier::connect(OsStr::new("")).unwrap().is_enabled());
        // A relative path or another scheme (vsock:…) is not ours to guess at.
        assert!(Notifier::connect(OsStr::new("run/notify")).is_err());
        assert!(Notifier::connect(OsStr::new("vsock:2:1234")).is_err());
        // An over-long path is an error, not a panic.
        let long = format!("/{}", "a".repeat(200));
        assert!(Notifier::connect(OsStr::new(&long)).is_err());
    }

    #[test]
    fn a_manager_that_went_away_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        drop(UnixDatagram::bind(&path).unwrap());
        let n = Notifier::connect(path.as_os_str()).unwrap();
        // ECONNREFUSED (the socket file is left, nobody reads): logged once, no panic.
        n.ready("up");
        n.ready("up");
        assert!(n.failed.load(Ordering::Relaxed));
    }

    #[test]
    fn disabled_sends_nothing() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("up");
        n.stopping("down");
    }
}
