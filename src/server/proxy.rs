//! PROXY protocol (v1 text and v2 binary) in front of a listener: the load balancer tells us
//! who the client is. Believed only from `guard.trusted_proxies`; required on listeners
//! configured for it. The header is read exactly — not a byte of the client's TLS hello past
//! it — and parsed by the `ppp` crate; a missing, malformed or oversized header closes the
//! connection without a greeting.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1: "PROXY TCP6 <39> <39> <5> <5>\r\n" is at most 107 bytes.
pub const V1_MAX: usize = 107;
/// v2: the address block and TLVs we accept at most (AWS/GCP TLVs fit well within).
pub const V2_MAX_BODY: usize = 1024;

/// Why a header was refused (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    Timeout,
    Closed,
    Malformed,
}

impl ProxyError {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyError::Timeout => "refused_proxy_timeout",
            ProxyError::Closed => "refused_proxy_closed",
            ProxyError::Malformed => "refused_proxy_malformed",
        }
    }
}

/// Reads the header within `timeout`; returns the client's address (the proxy's own for
/// LOCAL/UNKNOWN headers, which health checks send).
pub async fn read_header<R: AsyncRead + Unpin>(
    tcp: &mut R,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, ProxyError> {
    match tokio::time::timeout(timeout, read(tcp)).await {
        Err(_) => Err(ProxyError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(header)) => parse(&header, peer),
    }
}

async fn read<R: AsyncRead + Unpin>(tcp: &mut R) -> Result<Vec<u8>, ProxyError> {
    let mut buf = vec![0u8; 12];
    tcp.read_exact(&mut buf)
        .await
        .map_err(|_| ProxyError::Closed)?;
    if buf.as_slice() == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        tcp.read_exact(&mut fixed)
            .await
            .map_err(|_| ProxyError::Closed)?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if len > V2_MAX_BODY {
            return Err(ProxyError::Malformed);
        }
        buf.extend_from_slice(&fixed);
        let start = buf.len();
        buf.resize(start + len, 0);
        tcp.read_exact(buf.get_mut(start..).unwrap_or_default())
            .await
            .map_err(|_| ProxyError::Closed)?;
        return Ok(buf);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Malformed);
    }
    // v1: byte by byte up to CRLF, so nothing after the header is consumed.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed);
        }
        let b = tcp.read_u8().await.map_err(|_| ProxyError::Closed)?;
        buf.push(b);
    }
    Ok(buf)
}

/// The client address a complete header names.
pub fn parse(header: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    use ppp::HeaderResult;
    match HeaderResult::parse(header) {
        HeaderResult::V2(Ok(h)) => {
            if h.command == ppp::v2::Command::Local {
                return Ok(peer);
            }
            match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Ok(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Ok(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                // Not TCP over IP: treat like LOCAL (the spec lets the receiver do so).
                ppp::v2::Addresses::Unspecified => Ok(peer),
                ppp::v2::Addresses::Unix(_) => Err(ProxyError::Malformed),
            }
        }
        HeaderResult::V1(Ok(h)) => match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Ok(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Ok(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            ppp::v1::Addresses::Unknown => Ok(peer),
        },
        _ => Err(ProxyError::Malformed),
    }
}

/// A v2 PROXY header for a TCP connection from `client` to `server` (tests and tools).
pub fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, server),
    )
    .build()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    fn peer() -> SocketAddr {
        "10.0.0.9:5000".parse().unwrap()
    }

    #[test]
    fn v1_and_v2_name_the_client() {
        let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 993\r\n";
        assert_eq!(
            parse(v1, peer()).unwrap(),
            "198.51.100.7:40000".parse().unwrap()
        );
        let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n";
        assert_eq!(
            parse(v1, peer()).unwrap(),
            "[2001:db8::7]:40000".parse().unwrap()
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", peer()).unwrap(), peer());
        for (client, server) in [
            ("203.0.113.5:1234", "10.0.0.1:993"),
            ("[2001:db8::5]:1234", "[2001:db8::1]:993"),
        ] {
            let client: SocketAddr = client.parse().unwrap();
            let v2 = v2_header(client, server.parse().unwrap());
            assert_eq!(parse(&v2, peer()).unwrap(), client);
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            &b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 1.1.1.1\r\n",
            b"PROXY TCP7 1.1.1.1 2.2.2.2 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
        ] {
            assert_eq!(parse(bad, peer()), Err(ProxyError::Malformed), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_no_further() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"PROXY TCP4 192.0.2.1 10.0.0.1 5555 993\r\nHELLO")
                .await
                .unwrap();
            s
        });
        let (mut tcp, peer) = l.accept().await.unwrap();
        let got = read_header(&mut tcp, peer, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, "192.0.2.1:5555".parse().unwrap());
        let mut rest = [0u8; 5];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn a_silent_or_oversized_peer_is_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (mut tcp, peer) = l.accept().await.unwrap();
        assert_eq!(
            read_header(&mut tcp, peer, Duration::from_millis(100)).await,
            Err(ProxyError::Timeout)
        );
        let c2 = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut long = b"PROXY ".to_vec();
            long.extend(std::iter::repeat_n(b'1', 200));
            let _ = s.write_all(&long).await;
            s
        });
        let (mut tcp, peer) = l.accept().await.unwrap();
        assert_eq!(
            read_header(&mut tcp, peer, Duration::from_secs(5)).await,
            Err(ProxyError::Malformed)
        );
        drop(c2.await.unwrap());
    }
}
