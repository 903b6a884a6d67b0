//! The TLS front: invariants 1, 2 and 11, SNI, ALPN, handshake deadline, admission caps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::harness::*;

#[tokio::test]
async fn starttls_port_refuses_every_credential_before_tls() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = Client::plain(t.imap(), &t.pki.ca_der).await;
    let greeting = c.line().await.unwrap();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED]"),
        "{greeting}"
    );
    assert!(!greeting.contains("AUTH="));
    let caps = c.cmd("a", "CAPABILITY").await;
    assert!(
        caps[0].contains("STARTTLS")
            && caps[0].contains("LOGINDISABLED")
            && !caps[0].contains("AUTH="),
        "{caps:?}"
    );
    // A loopback client gets no exemption.
    let user = "alice@example.org";
    let r = c
        .cmd("b", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert_eq!(r, vec!["b NO [PRIVACYREQUIRED] TLS required\r\n"]);
    // AUTHENTICATE: a NO and never a `+` continuation.
    let r = c.cmd("c", "AUTHENTICATE PLAIN").await;
    assert_eq!(r, vec!["c NO [PRIVACYREQUIRED] TLS required\r\n"]);
    let r = c
        .cmd("d", "AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHg=")
        .await;
    assert_eq!(r, vec!["d NO [PRIVACYREQUIRED] TLS required\r\n"]);
    // A literal would carry the password: refused without `+`.
    c.send("e LOGIN {17}\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        "e NO [PRIVACYREQUIRED] TLS required\r\n"
    );
    assert_eq!(t.metric("imapgate_auth_attempts_total", &[]).await, 0.0);
}

#[tokio::test]
async fn starttls_drops_pipelined_commands_and_shows_post_tls_capabilities() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = Client::plain(t.imap(), &t.pki.ca_der).await;
    c.line().await.unwrap();
    // CVE-2011-0411: a command injected behind STARTTLS must never be answered.
    c.send("a STARTTLS\r\nb CAPABILITY\r\n").await;
    assert_eq!(
        c.line().await.unwrap(),
        "a OK Begin TLS negotiation now\r\n"
    );
    let mut c = c.starttls().await.unwrap();
    let r = c.cmd("c", "CAPABILITY").await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[0].starts_with("* CAPABILITY IMAP4rev1"), "{r:?}");
    assert!(
        !r[0].contains("STARTTLS")
            && !r[0].contains("LOGINDISABLED")
            && r[0].contains("AUTH=PLAIN"),
        "{r:?}"
    );
    assert!(
        r.iter().all(|l| !l.starts_with("b ")),
        "injected command answered: {r:?}"
    );
    // A second STARTTLS is a protocol error.
    let r = c.cmd("d", "STARTTLS").await;
    assert!(last(&r).starts_with("d BAD"), "{r:?}");
    // And the login works over the upgraded connection.
    let user = "bob@example.org";
    let r = c
        .cmd("e", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("e OK [CAPABILITY "), "{r:?}");
    let r = c.cmd("f", "SELECT INBOX").await;
    assert!(last(&r).starts_with("f OK"), "{r:?}");
}

#[tokio::test]
async fn implicit_tls_port_has_no_starttls() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    let mut c = Client::tls(t.imaps(), &t.pki.ca_der).await;
    let g = c.line().await.unwrap();
    assert_eq!(
        g, "* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] ready\r\n",
        "no product name, no STARTTLS"
    );
    let r = c.cmd("a", "STARTTLS").await;
    assert!(last(&r).starts_with("a BAD"), "{r:?}");
}

#[tokio::test]
async fn the_server_prefers_aes_128_gcm_whatever_the_client_lists_first() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use rustls::pki_types::ServerName;
    use rustls::CipherSuite as S;
    // aws-lc-rs's default client lists the AES-256 suites first; the gateway's order wins.
    for (versions, want) in [
        (&[&rustls::version::TLS13][..], S::TLS13_AES_128_GCM_SHA256),
        (
            &[&rustls::version::TLS12][..],
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        assert!(
            matches!(
                provider.cipher_suites.first().map(|s| s.suite()),
                Some(S::TLS13_AES_256_GCM_SHA384)
            ),
            "the client no longer lists AES-256 first: the check proves nothing"
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(t.pki.ca_der.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(t.imaps()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let got = tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(got, Some(want), "{versions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_implicit_tls_greeting_arrives_before_the_client_finishes_its_handshake() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use std::io::{Read, Write};
    let ca = t.pki.ca_der.clone();
    let addr = t.imaps();
    // A TLS 1.3 client driven by hand: it sends its ClientHello, reads the server's flight,
    // and never sends its Finished. The greeting must already be there (half-RTT data).
    let greeting = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"imap".to_vec()];
        let mut conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The ClientHello only: nothing else is queued yet.
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        tcp.write_all(&hello).unwrap();
        let mut plain = Vec::new();
        let mut raw = [0u8; 16384];
        while !plain.ends_with(b"\r\n") {
            let n = tcp.read(&mut raw).unwrap();
            assert!(n > 0, "closed before the greeting");
            conn.read_tls(&mut &raw[..n]).unwrap();
            conn.process_new_packets().unwrap();
            let mut chunk = [0u8; 1024];
            match conn.reader().read(&mut chunk) {
                Ok(k) => plain.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        // Our Finished is still unsent.
        assert!(conn.wants_write(), "the client's Finished went out");
        String::from_utf8(plain).unwrap()
    })
    .await
    .unwrap();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1"),
        "{greeting}"
    );
}

#[tokio::test]
async fn tickets_come_with_the_first_reply_and_the_next_connection_resumes() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = client_tls(&t.pki.ca_der, &[b"imap"]);
    let name = ServerName::try_from("localhost").unwrap();
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(t.imaps()).await.unwrap();
        connector.connect(name.clone(), tcp).await.unwrap()
    };
    async fn read_line(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("no reply")
                .unwrap();
            assert_eq!(n, 1, "closed");
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }
    let mut first = connect().await;
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    assert!(read_line(&mut first).await.starts_with("* OK"));
    first.write_all(b"a NOOP\r\n").await.unwrap();
    assert_eq!(read_line(&mut first).await, "a OK NOOP completed\r\n");
    drop(first);
    // The tickets held back at the end of the handshake went out with that reply.
    let mut second = connect().await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "no session ticket reached the client"
    );
    assert!(read_line(&mut second).await.starts_with("* OK"));
}

#[tokio::test]
async fn a_ticket_still_resumes_after_hundreds_of_other_clients() {
    // An organisation's clients reconnect all day: a ticket must not depend on a small
    // server-side cache that the next few hundred handshakes push it out of.
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    async fn handshake(
        addr: std::net::SocketAddr,
        connector: tokio_rustls::TlsConnector,
    ) -> Option<rustls::HandshakeKind> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind();
        let mut tls = tokio::io::BufReader::new(tls);
        let mut line = String::new();
        let within = Duration::from_secs(10);
        tokio::time::timeout(within, tls.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(line.starts_with("* OK"), "{line}");
        // The tickets travel with the first reply.
        tls.get_mut().write_all(b"a NOOP\r\n").await.unwrap();
        line.clear();
        tokio::time::timeout(within, tls.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(line, "a OK NOOP completed\r\n");
        kind
    }
    let addr = t.imaps();
    let ours = client_tls(&t.pki.ca_der, &[b"imap"]);
    assert_eq!(
        handshake(addr, ours.clone()).await,
        Some(rustls::HandshakeKind::Full)
    );
    // 300 other clients, each with its own session cache (a full handshake each), 10 at a time.
    for _ in 0..30 {
        let mut others = tokio::task::JoinSet::new();
        for _ in 0..10 {
            others.spawn(handshake(addr, client_tls(&t.pki.ca_der, &[b"imap"])));
        }
        while let Some(kind) = others.join_next().await {
            assert_eq!(kind.unwrap(), Some(rustls::HandshakeKind::Full));
        }
    }
    assert_eq!(
        handshake(addr, ours).await,
        Some(rustls::HandshakeKind::Resumed),
        "the ticket no longer resumes"
    );
}

#[tokio::test]
async fn alpn_without_imap_is_refused_alpaca() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    // Offering only http/1.1 (a cross-protocol attack) fails the handshake.
    let bad = Client::tls_alpn(t.imaps(), &t.pki.ca_der, &[b"http/1.1"]).await;
    let refused = match bad {
        Err(_) => true,
        Ok(mut c) => c.closed_within(Duration::from_secs(3)).await,
    };
    assert!(refused, "a client offering ALPN without imap was served");
    // The server counts the failure right after sending its alert: allow it a moment.
    let mut counted = 0.0;
    for _ in 0..50 {
        counted = t
            .metric(
                "imapgate_tls_handshake_failures_total",
                &["reason=\"alpn\""],
            )
            .await;
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted, 1.0, "{}", http_get(t.gw.admin, "/metrics").await.1);
    // Offering imap, or no ALPN at all, works.
    let mut ok = Client::tls_alpn(t.imaps(), &t.pki.ca_der, &[b"http/1.1", b"imap"])
        .await
        .unwrap();
    assert!(ok.line().await.unwrap().starts_with("* OK"));
    let mut none = Client::tls_alpn(t.imaps(), &t.pki.ca_der, &[])
        .await
        .unwrap();
    assert!(none.line().await.unwrap().starts_with("* OK"));
}

#[tokio::test]
async fn sni_selects_the_matching_certificate() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use rustls::pki_types::ServerName;
    // The second certificate is only valid for mail.other.test: verification with that name
    // succeeds only if the gateway picked it.
    let tcp = tokio::net::TcpStream::connect(t.imaps()).await.unwrap();
    let tls = client_tls(&t.pki.ca_der, &[b"imap"])
        .connect(ServerName::try_from("mail.other.test").unwrap(), tcp)
        .await;
    assert!(
        tls.is_ok(),
        "SNI mail.other.test did not get its certificate: {:?}",
        tls.err()
    );
    // Unknown names get the default (first) certificate, valid for localhost only.
    let tcp = tokio::net::TcpStream::connect(t.imaps()).await.unwrap();
    let tls = client_tls(&t.pki.ca_der, &[b"imap"])
        .connect(ServerName::try_from("unknown.test").unwrap(), tcp)
        .await;
    assert!(
        tls.is_err(),
        "unknown SNI name verified against some certificate"
    );
}

#[tokio::test]
async fn tls_below_1_2_is_impossible_and_handshake_has_a_deadline() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  tls_handshake_timeout: 1s".into(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    // A TCP connect that never sends a ClientHello is closed by the handshake timeout.
    let mut c = Client::plain(t.imaps(), &t.pki.ca_der).await;
    let started = std::time::Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(5)).await,
        "silent client not closed"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        c.pending().is_empty(),
        "the gateway spoke before TLS on the implicit port"
    );
    assert_eq!(
        t.metric(
            "imapgate_tls_handshake_failures_total",
            &["reason=\"timeout\""]
        )
        .await,
        1.0
    );
    // A real TLS 1.1 client is refused; the same client with TLS 1.2 gets the greeting.
    if have("openssl") {
        let port = t.imaps().port().to_string();
        let run = |v: &'static str| {
            let port = port.clone();
            async move {
                let out = tokio::process::Command::new("openssl")
                    .args([
                        "s_client",
                        "-connect",
                        &format!("127.0.0.1:{port}"),
                        "-brief",
                        v,
                        "-cipher",
                        "DEFAULT@SECLEVEL=0",
                        "-alpn",
                        "imap",
                    ])
                    .stdin(std::process::Stdio::null())
                    .output();
                let out = tokio::time::timeout(Duration::from_secs(20), out)
                    .await
                    .expect("openssl hung")
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr)
            }
        };
        let old = run("-tls1_1").await;
        assert!(
            !old.contains("CONNECTION ESTABLISHED") && !old.contains("* OK"),
            "TLS 1.1 accepted: {old}"
        );
        let ok = run("-tls1_2").await;
        assert!(
            ok.contains("CONNECTION ESTABLISHED"),
            "TLS 1.2 refused: {ok}"
        );
    }
}

#[tokio::test]
async fn preauth_connections_per_ip_are_capped_before_tls() {
    let Some(t) = TestGateway::start_with(Options {
        limits: "  max_preauth_per_ip: 3".into(),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::plain(t.imap(), &t.pki.ca_der).await;
        assert!(c.line().await.unwrap().starts_with("* OK"));
        held.push(c);
    }
    let mut fourth = Client::plain(t.imap(), &t.pki.ca_der).await;
    assert!(
        fourth.closed_within(Duration::from_secs(3)).await,
        "fourth pre-auth connection admitted"
    );
    assert!(fourth.pending().is_empty());
    assert_eq!(
        t.metric(
            "imapgate_connections_total",
            &["outcome=\"refused_preauth_per_ip\""]
        )
        .await,
        1.0
    );
    // Logging in frees the pre-auth slot.
    let user = "carol@example.org";
    let mut c = held.pop().unwrap();
    let mut c = {
        c.cmd("s", "STARTTLS").await;
        c.starttls().await.unwrap()
    };
    let r = c
        .cmd("l", &format!("LOGIN {user} \"{}\"", t.password(user)))
        .await;
    assert!(last(&r).starts_with("l OK"), "{r:?}");
    let mut fifth = Client::plain(t.imap(), &t.pki.ca_der).await;
    assert!(fifth.line().await.unwrap().starts_with("* OK"));
}

#[tokio::test]
async fn certificates_reload_without_dropping_sessions() {
    let Some(t) = TestGateway::start().await else {
        return;
    };
    use rustls::pki_types::ServerName;
    let mut relayed = t.logged_in("alice@example.org").await;
    let connect = |name: &'static str| {
        let ca = t.pki.ca_der.clone();
        let addr = t.imaps();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            client_tls(&ca, &[b"imap"])
                .connect(ServerName::try_from(name).unwrap(), tcp)
                .await
        }
    };
    assert!(
        connect("reloaded.test").await.is_err(),
        "name valid before the reload"
    );
    // Replace the default certificate on disk, then reload (what SIGHUP does).
    t.pki
        .issue("gateway", &["localhost", "127.0.0.1", "reloaded.test"]);
    t.gw.reload();
    assert!(
        connect("reloaded.test").await.is_ok(),
        "new certificate not served after reload"
    );
    // The session that was open before the reload still works.
    let r = relayed.cmd("n", "NOOP").await;
    assert!(last(&r).starts_with("n OK"), "{r:?}");
    // A broken certificate file keeps the previous set.
    std::fs::write(t.pki.dir.join("gateway.pem"), "not a certificate").unwrap();
    t.gw.reload();
    assert!(
        connect("reloaded.test").await.is_ok(),
        "a failed reload dropped the certificates"
    );
}

/// A /64 routed to loopback for one test (`ip -6 route add local …/64 dev lo`): traffic to and
/// from it never leaves the machine. Removed on drop.
struct LocalPrefix(String);

impl LocalPrefix {
    fn add() -> Option<LocalPrefix> {
        // A documentation prefix (RFC 3849), a different /64 per test process.
        let prefix = format!(
            "2001:db8:{:x}:{:x}::/64",
            std::process::id() & 0xffff,
            rand_u16()
        );
        let ok = std::process::Command::new("ip")
            .args(["-6", "route", "add", "local", &prefix, "dev", "lo"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !require_real(),
                "cannot route {prefix} to loopback (needs root and iproute2)"
            );
            eprintln!("skipped: cannot route {prefix} to loopback");
            return None;
        }
        Some(LocalPrefix(prefix))
    }

    /// The n-th address of the prefix.
    fn addr(&self, n: u16) -> std::net::Ipv6Addr {
        let net: ipnet::Ipv6Net = self.0.parse().unwrap();
        let mut o = net.network().octets();
        o[14..].copy_from_slice(&n.to_be_bytes());
        std::net::Ipv6Addr::from(o)
    }
}

impl Drop for LocalPrefix {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-6", "route", "del", "local", &self.0, "dev", "lo"])
            .status();
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() & 0xffff) as u16
}

/// A TCP connection to `to` from `from`, an address of a loopback-routed prefix.
async fn connect_from(from: std::net::Ipv6Addr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    s.set_freebind_v6(true).unwrap();
    s.bind(&SocketAddr::new(from.into(), 0).into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    s.connect(to).await.unwrap()
}

/// One host with a /64 cannot hold the per-address caps once per address: admission counts
/// IPv6 clients per `guard.subnet_v6` prefix.
#[tokio::test]
async fn preauth_connections_are_capped_per_ipv6_64() {
    let Some(prefix) = LocalPrefix::add() else {
        return;
    };
    let Some(t) = TestGateway::start_with(Options {
        limits: "  max_preauth_per_ip: 3".into(),
        extra_listeners: "  - { name: v6, address: \"[::1]:0\", tls: starttls }",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let v6 = t.gw.listener("v6").unwrap();
    let mut held = Vec::new();
    for n in 1..=3 {
        let mut s = connect_from(prefix.addr(n), v6).await;
        let mut greeting = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&greeting, b"* OK");
        held.push(s);
    }
    // A fourth address of the same /64 is the same source: refused before TLS.
    let mut fourth = connect_from(prefix.addr(0x4444), v6).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), fourth.read(&mut buf))
        .await
        .expect("fourth connection neither greeted nor closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "a fourth address of one /64 was admitted");
    assert_eq!(
        t.metric(
            "imapgate_connections_total",
            &["outcome=\"refused_preauth_per_ip\""]
        )
        .await,
        1.0
    );
    // ::1 is another /64: admitted.
    let mut other = tokio::net::TcpStream::connect(v6).await.unwrap();
    let mut greeting = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), other.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"* OK");
}
