//! After login: bytes both ways, unchanged (IDLE, COMPRESS=DEFLATE, literals of any size).
//!
//! The relay does not parse IMAP or POP3. SMTP sessions go through [`smtp::SmtpGuard`], which
//! reads command lines (never the message) so that a client cannot use the backend's trust in
//! the gateway (a second XCLIENT, XFORWARD, AUTH, STARTTLS) and hides those from a later EHLO. Each direction is its own copy loop so a slow reader on one
//! side never stalls the other (no deadlock when both sides write at once). The session ends
//! when either side closes, after `relay_idle_timeout` without a byte in either direction,
//! after `max_session_lifetime`, or `shutdown_grace` after the gateway stopped accepting. No
//! I/O other than
//! the two sockets happens here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod smtp;

/// Why a relayed session ended (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    Idle,
    Lifetime,
    Shutdown,
    /// The credential was revoked or the user disabled (`auth.revoke_closes_sessions`).
    Revoked,
    /// The SMTP client sent what a relayed session may not (its last line: `Violation::reply`).
    Refused(smtp::Violation),
}

pub struct RelayLimits {
    pub idle: Duration,
    pub lifetime: Duration,
    pub shutdown_grace: Duration,
}

/// The copy buffer while data flows: large, so that a bulk FETCH moves in few syscalls and
/// full TLS records.
const BUF: usize = 64 * 1024;

/// What a quiet direction waits with: room for a typical reply or notification (`* 3 EXISTS`,
/// `a OK NOOP completed`, a LOGOUT's `BYE` and `OK`) in one read, at 2 × 128 bytes per idle
/// session.
const FIRST: usize = 128;

/// Appends to `buf` (into its spare capacity, never zeroed first) only if data is ready now
/// (None: it would wait).
async fn read_now<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
) -> Option<std::io::Result<usize>> {
    std::future::poll_fn(|cx| {
        match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *from), cx, buf) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        }
    })
    .await
}

/// One direction. While the session is quiet (IDLE for hours) it holds no buffer: it waits on
/// a [`FIRST`]-byte read, and only when data arrives takes a [`BUF`] buffer, which it keeps while
/// more data is ready at once and gives back as soon as the flow pauses. An idle session costs
/// its sockets and TLS state, not 2 × 64 KiB. The buffer is not zeroed: reads fill its spare
/// capacity and only what was read is ever written.
async fn copy<R, W>(
    mut from: R,
    mut to: W,
    activity: &AtomicU64,
    epoch: Instant,
    bytes: &IntCounter,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut first = [0u8; FIRST];
        let n = from.read(&mut first).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut buf = BytesMut::with_capacity(BUF);
        buf.extend_from_slice(first.get(..n).unwrap_or(&[]));
        let mut eof = false;
        loop {
            // Gather what is ready now behind what we have, then write it in one go.
            while buf.len() < BUF {
                match read_now(&mut from, &mut buf).await {
                    Some(Ok(0)) => {
                        eof = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            to.write_all(&buf).await?;
            to.flush().await?;
            bytes.inc_by(buf.len() as u64);
            if eof {
                let _ = to.shutdown().await;
                return Ok(());
            }
            // More right away (a bulk transfer): keep the buffer; otherwise give it back.
            buf.clear();
            match read_now(&mut from, &mut buf).await {
                Some(Ok(0)) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Some(Ok(_)) => {
                    activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
    }
}

/// The SMTP guard both directions share (one task polls both: the lock is never contended or
/// held across an await), and the signal that DATA's answer arrived.
struct Shared {
    guard: std::sync::Mutex<smtp::SmtpGuard>,
    answered: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, smtp::SmtpGuard> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Client to backend through the SMTP guard: command lines are checked before they go out, and
/// after DATA nothing more goes until the backend answered.
async fn copy_up_guarded<R, W>(
    mut from: R,
    mut to: W,
    activity: &AtomicU64,
    epoch: Instant,
    bytes: &IntCounter,
    shared: &Shared,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(BUF);
    let mut out = Vec::with_capacity(BUF);
    let mut eof = false;
    loop {
        if buf.is_empty() {
            if eof {
                let _ = to.shutdown().await;
                return RelayEnd::ClientClosed;
            }
            // Room for a full read again (an emptied buffer reclaims its allocation).
            buf.reserve(BUF);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return RelayEnd::ClientClosed;
                }
                Ok(_) => activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed),
            }
            // Gather what is ready now behind it (a message arrives in many TLS records), so
            // that it goes out in few writes, as in the IMAP relay.
            while buf.len() < BUF {
                match read_now(&mut from, &mut buf).await {
                    Some(Ok(0)) => {
                        eof = true;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) => {
                        eof = true;
                        break;
                    }
                    None => break,
                }
            }
        }
        let used = match shared.lock().from_client(&buf, &mut out) {
            Ok(n) => n,
            Err(v) => return RelayEnd::Refused(v),
        };
        let _ = buf.split_to(used.min(buf.len()));
        if !out.is_empty() {
            let w = async {
                to.write_all(&out).await?;
                to.flush().await
            };
            if w.await.is_err() {
                return RelayEnd::BackendClosed;
            }
            bytes.inc_by(out.len() as u64);
            out.clear();
        }
        // Held behind DATA: wait for its answer (registered before looking, so none is lost).
        while !buf.is_empty() {
            let answered = shared.answered.notified();
            if !shared.lock().waiting() {
                break;
            }
            answered.await;
        }
    }
}

/// Backend to client through the SMTP guard (replies counted, a later EHLO reply filtered).
async fn copy_down_guarded<R, W>(
    mut from: R,
    mut to: W,
    activity: &AtomicU64,
    epoch: Instant,
    bytes: &IntCounter,
    shared: &Shared,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(BUF);
    let mut out = Vec::with_capacity(BUF);
    loop {
        buf.clear();
        match from.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return RelayEnd::BackendClosed;
            }
            Ok(_) => activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed),
        }
        let go_on = shared.lock().from_backend(&buf, &mut out);
        if go_on {
            shared.answered.notify_waiters();
        }
        if !out.is_empty() {
            let w = async {
                to.write_all(&out).await?;
                to.flush().await
            };
            if w.await.is_err() {
                return RelayEnd::ClientClosed;
            }
            bytes.inc_by(out.len() as u64);
            out.clear();
        }
    }
}

/// Relays until one of the ending conditions; an SMTP session (`smtp_guard`) through the guard.
#[allow(clippy::too_many_arguments)]
pub async fn run<C, B>(
    client: C,
    backend: B,
    limits: RelayLimits,
    to_backend: IntCounter,
    to_client: IntCounter,
    shutdown: CancellationToken,
    revoked: CancellationToken,
    smtp_guard: Option<smtp::SmtpGuard>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let (cr, cw) = tokio::io::split(client);
    let (br, bw) = tokio::io::split(backend);
    let shared = smtp_guard.map(|g| Shared {
        guard: std::sync::Mutex::new(g),
        answered: tokio::sync::Notify::new(),
    });
    let up = async {
        match &shared {
            Some(s) => copy_up_guarded(cr, bw, &activity, epoch, &to_backend, s).await,
            None => {
                let _ = copy(cr, bw, &activity, epoch, &to_backend).await;
                RelayEnd::ClientClosed
            }
        }
    };
    let down = async {
        match &shared {
            Some(s) => copy_down_guarded(br, cw, &activity, epoch, &to_client, s).await,
            None => {
                let _ = copy(br, cw, &activity, epoch, &to_client).await;
                RelayEnd::BackendClosed
            }
        }
    };
    tokio::pin!(up, down);

    let idle = async {
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let deadline = epoch + last + limits.idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(limits.shutdown_grace).await;
    };
    tokio::select! {
        end = &mut up => end,
        end = &mut down => end,
        () = idle => RelayEnd::Idle,
        () = tokio::time::sleep(limits.lifetime) => RelayEnd::Lifetime,
        () = grace => RelayEnd::Shutdown,
        () = revoked.cancelled() => RelayEnd::Revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn counter() -> IntCounter {
        IntCounter::new("t", "t").unwrap()
    }

    /// Relays between a client and a backend that stay connected and send nothing, until the
    /// relay ends; `stop` is the gateway's shutdown signal.
    async fn relay_silent_peers(limits: RelayLimits, stop: CancellationToken) -> RelayEnd {
        let (client, _cp) = duplex(64);
        let (backend, _bp) = duplex(64);
        let revoked = CancellationToken::new();
        run(
            client,
            backend,
            limits,
            counter(),
            counter(),
            stop,
            revoked,
            None,
        )
        .await
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_unchanged() {
        let (client, mut client_peer) = duplex(1024);
        let (backend, mut backend_peer) = duplex(1024);
        let limits = RelayLimits {
            idle: Duration::from_secs(60),
            lifetime: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(1),
        };
        let (a, b) = (counter(), counter());
        let task = tokio::spawn(run(
            client,
            backend,
            limits,
            a.clone(),
            b.clone(),
            CancellationToken::new(),
            CancellationToken::new(),
            None,
        ));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&p2).await.unwrap();
            client_peer.write_all(b"").await.unwrap();
            let mut back = vec![0u8; 5];
            client_peer.read_exact(&mut back).await.unwrap();
            (back, client_peer)
        });
        let mut got = vec![0u8; payload.len()];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload);
        backend_peer.write_all(b"hello").await.unwrap();
        let (back, _client_peer) = writer.await.unwrap();
        assert_eq!(back, b"hello");
        drop(backend_peer);
        assert_eq!(task.await.unwrap(), RelayEnd::BackendClosed);
        assert_eq!(a.get(), 200_000);
        assert_eq!(b.get(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_end() {
        let limits = RelayLimits {
            idle: Duration::from_secs(1800),
            lifetime: Duration::from_secs(86_400),
            shutdown_grace: Duration::from_secs(1),
        };
        let end = relay_silent_peers(limits, CancellationToken::new()).await;
        assert_eq!(end, RelayEnd::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_gives_grace_then_ends() {
        let stop = CancellationToken::new();
        stop.cancel();
        let limits = RelayLimits {
            idle: Duration::from_secs(1800),
            lifetime: Duration::from_secs(86_400),
            shutdown_grace: Duration::from_secs(30),
        };
        let started = Instant::now();
        let end = relay_silent_peers(limits, stop).await;
        assert_eq!(end, RelayEnd::Shutdown);
        assert!(started.elapsed() >= Duration::from_secs(30));
    }
}
