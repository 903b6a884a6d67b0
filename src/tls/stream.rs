//! A connection that is plain TCP or TLS, client- or server-side (STARTTLS upgrades in place).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plain TCP before STARTTLS (or to a `tls: none` backend), TLS otherwise.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<Wire>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TCP stream under a TLS session. On the client-facing side it holds back what rustls
/// writes after the handshake's first flight and before the handshake completes, when that is
/// TLS 1.3 application-data records: the session tickets sent once the client's Finished
/// arrives. They then leave with the session's first reply (one write and one packet fewer
/// per connection) instead of on their own. Clients never wait for tickets; everything a
/// client needs to finish the handshake is in the first flight (TLS 1.3) or starts with a
/// handshake or ChangeCipherSpec record (TLS 1.2), and is never held. Only a write that starts
/// a record is judged by its first byte: the rest of a write the socket took in part goes out
/// as it comes.
pub struct Wire {
    tcp: TcpStream,
    held: Vec<u8>,
    phase: WirePhase,
    /// The last write was taken only in part: the next one continues a record, and its first
    /// byte is not a record's content type.
    mid_record: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WirePhase {
    /// Server side, nothing written yet: the first flight goes out as is.
    First,
    /// Server side, handshake under way: TLS 1.3 records may be held.
    Handshake,
    /// Everything goes out (after anything held).
    Open,
}

/// TLS record content type of TLS 1.3's encrypted records (RFC 8446 §5.2).
const APPLICATION_DATA: u8 = 0x17;
/// More than tickets ever take: past this, nothing more is held.
const HOLD_MAX: usize = 16 * 1024;

impl Wire {
    /// For the server side of a handshake ([`Wire::handshake_done`] once it completes).
    pub fn server(tcp: TcpStream) -> Wire {
        Wire {
            tcp,
            held: Vec::new(),
            phase: WirePhase::First,
            mid_record: false,
        }
    }

    /// Writes go straight out (the backend side).
    pub fn open(tcp: TcpStream) -> Wire {
        Wire {
            tcp,
            held: Vec::new(),
            phase: WirePhase::Open,
            mid_record: false,
        }
    }

    /// The handshake completed: what was held leaves with the next write.
    pub fn handshake_done(&mut self) {
        self.phase = WirePhase::Open;
    }

    /// Bytes held back (for tests).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn hold(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        let first = bufs.iter().find(|b| !b.is_empty())?.first().copied();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        match self.phase {
            WirePhase::First => {
                self.phase = WirePhase::Handshake;
                None
            }
            WirePhase::Handshake
                if !self.mid_record
                    && first == Some(APPLICATION_DATA)
                    && self.held.len() + total <= HOLD_MAX =>
            {
                for b in bufs {
                    self.held.extend_from_slice(b);
                }
                Some(total)
            }
            _ => None,
        }
    }

    /// Writes `bufs` behind anything held, in one system call when possible.
    fn poll_out(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(n) = self.hold(bufs) {
            return Poll::Ready(Ok(n));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let r = self.poll_through(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.mid_record = n < total;
        }
        r
    }

    fn poll_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.held.is_empty() {
                return Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
            }
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(io::IoSlice::new(&self.held));
            all.extend(bufs.iter().map(|b| io::IoSlice::new(b)));
            let n = match Pin::new(&mut self.tcp).poll_write_vectored(cx, &all) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let held = self.held.len();
            if n < held {
                self.held.drain(..n);
                continue;
            }
            self.held = Vec::new();
            if n > held || bufs.iter().all(|b| b.is_empty()) {
                return Poll::Ready(Ok(n - held));
            }
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_out(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_out(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // What was held goes out before the end.
        while !me.held.is_empty() {
            match me.poll_out(cx, &[]) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Wire, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        (Wire::server(tcp), peer)
    }

    async fn nothing_arrives(peer: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        tokio::time::timeout(Duration::from_millis(200), peer.read(&mut b))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn tls13_records_after_the_first_flight_leave_with_the_next_write() {
        let (mut w, mut peer) = pair().await;
        // The first flight (a handshake record) goes out at once.
        w.write_all(&[0x16, 3, 3, 0, 1, 9]).await.unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x16, 3, 3, 0, 1, 9]);
        // Tickets (application-data records) written while the handshake completes are held.
        w.write_all(&[0x17, 3, 3, 0, 2, 1, 2]).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.held(), 7);
        assert!(nothing_arrives(&mut peer).await, "held bytes went out");
        w.handshake_done();
        // They precede the first reply, in one piece.
        w.write_all(&[0x17, 3, 3, 0, 1, 7]).await.unwrap();
        assert_eq!(w.held(), 0);
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x17, 3, 3, 0, 2, 1, 2, 0x17, 3, 3, 0, 1, 7]);
    }

    #[tokio::test]
    async fn a_tls12_final_flight_is_never_held_and_shutdown_sends_what_was() {
        let (mut w, mut peer) = pair().await;
        w.write_all(&[0x16, 1]).await.unwrap();
        // TLS 1.2's last flight starts with ChangeCipherSpec: the client waits for it.
        w.write_all(&[0x14, 2]).await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x16, 1, 0x14, 2]);
        // Held bytes are not lost when the connection ends without another write.
        w.write_all(&[0x17, 5]).await.unwrap();
        assert!(nothing_arrives(&mut peer).await);
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0x17, 5]);
    }

    #[tokio::test]
    async fn a_write_taken_in_part_is_continued_never_held() {
        // Small socket buffers, so that the first flight is taken in part and its continuation
        // (which starts with whatever byte comes next, here 0x17, not a record header) is
        // small enough to be held if it were mistaken for a record.
        let ls = tokio::net::TcpSocket::new_v4().unwrap();
        ls.set_recv_buffer_size(2048).unwrap(); // inherited by the accepted peer
        ls.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = ls.listen(8).unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(1024).unwrap();
        let tcp = sock.connect(l.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let mut w = Wire::server(tcp);
        let size = 12 * 1024;
        let mut flight = vec![0x17u8; size];
        flight[0] = 0x16;
        let mut parts = 0;
        let mut sent = 0;
        while sent < size {
            let n = std::future::poll_fn(|cx| {
                Pin::new(&mut w).poll_write(cx, flight.get(sent..).unwrap_or_default())
            });
            let n = match tokio::time::timeout(Duration::from_millis(200), n).await {
                Ok(r) => r.unwrap(),
                Err(_) => {
                    // The socket is full: let the peer read some, then go on.
                    let mut b = vec![0u8; 1024];
                    let _ = peer.read(&mut b).await.unwrap();
                    continue;
                }
            };
            parts += 1;
            sent += n;
        }
        assert_eq!(w.held(), 0, "a continuation was held back");
        let mut got = 0;
        let mut b = vec![0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), peer.read(&mut b)).await
        {
            if n == 0 {
                break;
            }
            got += n;
        }
        assert!(parts >= 2, "the flight went out whole: nothing was checked");
        assert!(got > 0);
    }

    #[tokio::test]
    async fn the_backend_side_never_holds() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let mut w = Wire::open(tcp);
        w.write_all(&[0x16]).await.unwrap();
        w.write_all(&[0x17, 1]).await.unwrap();
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x16, 0x17, 1]);
    }
}
