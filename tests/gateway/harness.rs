//! The test harness: a real Dovecot (started once per test binary), test certificates, a
//! gateway started in-process on 127.0.0.1:0, and a scripted IMAP client whose every read has
//! a timeout.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imapgate::auth::app_password;
use imapgate::auth::users::{AppPassword, User, UsersFile};
use imapgate::config::{Argon2Params, Config};
use imapgate::secret::Secret;
use imapgate::server::Gateway;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Fast argon2 for tests; production defaults are checked in unit tests.
pub(crate) const TEST_ARGON2: Argon2Params = Argon2Params {
    m_kib: 1024,
    t: 1,
    p: 1,
};

/// Whether real components are required (`IMAPGATE_REQUIRE_REAL=1`): then a missing one fails
/// the test instead of skipping it.
pub(crate) fn require_real() -> bool {
    std::env::var("IMAPGATE_REQUIRE_REAL").is_ok_and(|v| v == "1")
}

/// Returns false (skip) or panics (fail) when a tool is missing.
pub(crate) fn have(tool: &str) -> bool {
    let found = which(tool).is_some();
    if !found {
        assert!(
            !require_real(),
            "{tool} is required (IMAPGATE_REQUIRE_REAL=1) but not installed"
        );
        eprintln!("skipping: {tool} not installed");
    }
    found
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/sbin";
    path.split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway `redis-server` (Debian's) on a free loopback port, with a password, no
/// persistence; stopped on drop. It can be stopped and started again on the same port.
pub(crate) struct RedisServer {
    pub port: u16,
    pub password: String,
    dir: tempfile::TempDir,
    child: std::sync::Mutex<Option<std::process::Child>>,
    /// More `redis-server` arguments (see [`RedisServer::start_with`]).
    extra: Vec<String>,
}

impl RedisServer {
    /// None (skip) when redis-server is missing, unless IMAPGATE_REQUIRE_REAL=1 (then fail).
    pub(crate) fn start() -> Option<RedisServer> {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with more `redis-server` arguments, e.g.
    /// `["--maxmemory", "1mb", "--maxmemory-policy", "allkeys-lru"]`.
    pub(crate) fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if !have("redis-server") {
            return None;
        }
        let r = RedisServer {
            port: free_port(),
            password: format!("r-{}", app_password::generate().expose_str().unwrap()),
            dir: tempfile::tempdir().unwrap(),
            child: std::sync::Mutex::new(None),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.resume();
        Some(r)
    }

    /// The URL the gateway is given (it holds the password).
    pub(crate) fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}/", self.password, self.port)
    }

    /// Starts the server (again) and waits until it answers.
    pub(crate) fn resume(&self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                &self.password,
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        for _ in 0..100 {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (like a crash: no clean shutdown).
    pub(crate) fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli` against it; stdout.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "--no-auth-warning",
                "-a",
                &self.password,
            ])
            .args(args)
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test CA and the certificates it signs.
pub(crate) struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_der: CertificateDer<'static>,
}

impl Pki {
    pub(crate) fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "imapgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca_pem,
            ca_der: cert.der().clone(),
            ca_params: params,
            ca_key: key,
        }
    }

    /// Issues a leaf for `names`; returns (cert path, key path).
    pub(crate) fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let c = self.dir.join(format!("{stem}.pem"));
        let k = self.dir.join(format!("{stem}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// The shared Dovecot: one per test binary.
pub(crate) struct Dovecot {
    pub dir: PathBuf,
    pub imaps: SocketAddr,
    pub imap: SocketAddr,
    /// POP3 (RFC 1939) with STLS (RFC 2595; no login before it), and POP3 over implicit TLS.
    /// The master user logs in as `user*gateway` (USER/PASS) or with AUTH PLAIN and authzid.
    pub pop3: SocketAddr,
    pub pop3s: SocketAddr,
    /// LMTP (RFC 2033), plain, loopback: the harness's Postfix delivers `@example.org` here.
    pub lmtp: SocketAddr,
    /// Dovecot's submission service (RFC 6409): STARTTLS port and implicit-TLS port, AUTH
    /// PLAIN/LOGIN after TLS (the master user as for IMAP); it relays every message to the
    /// harness's Postfix smtpd ([`mail_ports`]), plain, without XCLIENT.
    pub submission: SocketAddr,
    pub submissions: SocketAddr,
    pub master_user: String,
    pub master_secret_file: PathBuf,
    pub master_password: String,
    pub pki: Pki,
    /// Users and their own Dovecot passwords (for direct comparison only).
    pub users: Vec<(String, String)>,
}

pub(crate) const USERS: &[&str] = &[
    "alice@example.org",
    "bob@example.org",
    "carol@example.org",
    "dave@example.org",
    "erin@example.org",
    "frank@example.org",
    // Users whose name starts with "m" are enrolled in TOTP by the test gateway.
    "mia@example.org",
    "max@example.org",
    "mo@example.org",
    "milo@example.org",
];

/// Mailboxes on the shared Dovecot only (not in the gateway's users file unless a test adds
/// them with `Options::extra_users`), one per mail-delivery test: mail those tests deliver
/// never lands in a mailbox that another test compares or counts.
pub(crate) const MAIL_USERS: &[&str] = &[
    "pat@example.org",
    "quinn@example.org",
    "rosa@example.org",
    "sam@example.org",
    "tess@example.org",
    // The gateway's own SMTP and POP3 fronts (mail_fronts.rs)
    "uma@example.org",
    "vic@example.org",
    "wes@example.org",
];

static DOVECOT: OnceLock<Option<Arc<Dovecot>>> = OnceLock::new();

/// The shared Dovecot, started on first use; `None` (skip) when not installed and not required.
pub(crate) fn dovecot() -> Option<Arc<Dovecot>> {
    DOVECOT
        .get_or_init(|| {
            if have("dovecot") {
                Some(Arc::new(start_dovecot()))
            } else {
                None
            }
        })
        .clone()
}

/// Writes a secret file the way an operator must: readable by its owner only (the gateway
/// refuses secret files others can read).
pub(crate) fn write_secret(p: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(p, contents).unwrap();
    chmod(p, 0o600);
}

pub(crate) fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn start_dovecot() -> Dovecot {
    // A short path: Dovecot's sockets must fit in 108 bytes.
    let dir = tempfile::Builder::new()
        .prefix("igd")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    for d in ["run", "state", "mail"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    for d in [dir.clone(), dir.join("run"), dir.join("state")] {
        chmod(&d, 0o755);
    }
    let pki = Pki::new(&dir.join("tls"));
    chmod(&dir.join("tls"), 0o755);
    let (cert, key) = pki.issue("dovecot", &["localhost", "127.0.0.1"]);
    let master_password = format!("m-{}", app_password::generate().expose_str().unwrap());
    let master_secret_file = dir.join("master.secret");
    std::fs::write(&master_secret_file, &master_password).unwrap();
    chmod(&master_secret_file, 0o600);
    std::fs::write(
        dir.join("masters"),
        format!("gateway:{{PLAIN}}{master_password}\n"),
    )
    .unwrap();
    let users: Vec<(String, String)> = USERS
        .iter()
        .chain(MAIL_USERS)
        .map(|u| {
            (
                u.to_string(),
                format!("own-{}", app_password::generate().expose_str().unwrap()),
            )
        })
        .collect();
    let passwd: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
        .collect();
    std::fs::write(dir.join("users"), passwd).unwrap();
    for f in ["masters", "users"] {
        let p = dir.join(f);
        let ok = Command::new("chown")
            .arg("root:dovecot")
            .arg(&p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown root:dovecot failed (is the dovecot user there?)");
        chmod(&p, 0o640);
    }
    let ok = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(dir.join("mail"))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (imaps, imap) = (free_port(), free_port());
    let d = dir.display();
    let conf = format!(
        "base_dir = {d}/run\nstate_dir = {d}/state\ninstance_name = igd-{imaps}\nlog_path = {d}/dovecot.log\n\
         protocols = imap pop3 lmtp submission\nlisten = 127.0.0.1\nssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n\
         ssl_min_protocol = TLSv1.2\nssl_dh = </usr/share/dovecot/dh.pem\ndisable_plaintext_auth = yes\n\
         auth_mechanisms = plain login\nauth_master_user_separator = *\nlogin_trusted_networks = 127.0.0.1\n\
         mail_uid = nobody\nmail_gid = nogroup\nmail_location = maildir:~/Maildir\nmail_max_userip_connections = 1000\n\
         mail_plugins = zlib\nprotocol imap {{\n  mail_plugins = zlib imap_zlib\n}}\n\
         auth_failure_delay = 0\nservice anvil {{\n  unix_listener anvil-auth-penalty {{\n    mode = 0\n  }}\n}}\n\
         passdb {{\n  driver = passwd-file\n  args = {d}/masters\n  master = yes\n  result_success = continue\n}}\n\
         passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
         userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={d}/mail/%u\n}}\n\
         service imap-login {{\n  inet_listener imap {{\n    port = {imap}\n  }}\n  inet_listener imaps {{\n    port = {imaps}\n    ssl = yes\n  }}\n}}\n",
        cert = cert.display(),
        key = key.display(),
    );
    let mail = mail_services_conf();
    let conf_path = dir.join("dovecot.conf");
    std::fs::write(&conf_path, conf + &mail.conf).unwrap();
    let bin = which("dovecot").unwrap();
    // Dovecot runs in the foreground under a shell that kills it when this test process ends,
    // then removes its directory (mailboxes and all), which nothing else would.
    let script = format!(
        "{} -F -c {} & D=$!; while kill -0 {} 2>/dev/null && kill -0 $D 2>/dev/null; do sleep 1; done; kill $D 2>/dev/null; wait $D; rm -rf '{}'",
        bin.display(),
        conf_path.display(),
        std::process::id(),
        dir.display()
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The watchdog shell ends by itself with this process; reap it from a thread.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let imaps_addr: SocketAddr = format!("127.0.0.1:{imaps}").parse().unwrap();
    let imap_addr: SocketAddr = format!("127.0.0.1:{imap}").parse().unwrap();
    for i in 0..100 {
        if std::net::TcpStream::connect(imaps_addr).is_ok()
            && std::net::TcpStream::connect(imap_addr).is_ok()
            && mail
                .addrs()
                .iter()
                .all(|a| std::net::TcpStream::connect(a).is_ok())
        {
            break;
        }
        assert!(
            i < 99,
            "dovecot did not start: {}",
            std::fs::read_to_string(dir.join("dovecot.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Dovecot {
        dir,
        imaps: imaps_addr,
        imap: imap_addr,
        pop3: mail.pop3,
        pop3s: mail.pop3s,
        lmtp: mail.lmtp,
        submission: mail.submission,
        submissions: mail.submissions,
        master_user: "gateway".into(),
        master_secret_file,
        master_password,
        pki,
        users,
    }
}

/// A rustls client config trusting the test CA, with optional ALPN.
pub(crate) fn client_tls(
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A scripted IMAP client; every read has a timeout.
pub(crate) struct Client {
    pub stream: Box<dyn Stream>,
    buf: Vec<u8>,
    pub ca: CertificateDer<'static>,
}

impl Client {
    pub(crate) async fn plain(addr: SocketAddr, ca: &CertificateDer<'static>) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        Client {
            stream: Box::new(s),
            buf: Vec::new(),
            ca: ca.clone(),
        }
    }

    pub(crate) async fn tls(addr: SocketAddr, ca: &CertificateDer<'static>) -> Client {
        Self::tls_alpn(addr, ca, &[b"imap"]).await.unwrap()
    }

    /// A TLS client whose connection comes from the loopback address `local`.
    pub(crate) async fn tls_from(
        addr: SocketAddr,
        local: &str,
        ca: &CertificateDer<'static>,
    ) -> Client {
        Self::tls_from_alpn(addr, local, ca, &[b"imap"]).await
    }

    /// [`Client::tls_from`] offering `alpn` (none for an SMTP or POP3 client).
    pub(crate) async fn tls_from_alpn(
        addr: SocketAddr,
        local: &str,
        ca: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
        let s = sock.connect(addr).await.unwrap();
        let t = client_tls(ca, alpn)
            .connect(ServerName::try_from("localhost").unwrap(), s)
            .await
            .unwrap();
        Client {
            stream: Box::new(t),
            buf: Vec::new(),
            ca: ca.clone(),
        }
    }

    /// A TLS client from the loopback address `local` that first sends `header` (a PROXY
    /// protocol header) in the clear, as a load balancer does.
    pub(crate) async fn tls_after_header(
        addr: SocketAddr,
        local: &str,
        header: &[u8],
        ca: &CertificateDer<'static>,
    ) -> std::io::Result<Client> {
        Self::tls_after_header_alpn(addr, local, header, ca, &[b"imap"]).await
    }

    /// [`Client::tls_after_header`] offering `alpn` (none for an SMTP or POP3 client).
    pub(crate) async fn tls_after_header_alpn(
        addr: SocketAddr,
        local: &str,
        header: &[u8],
        ca: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> std::io::Result<Client> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(format!("{local}:0").parse().unwrap())?;
        let mut s = sock.connect(addr).await?;
        s.write_all(header).await?;
        let t = client_tls(ca, alpn)
            .connect(ServerName::try_from("localhost").unwrap(), s)
            .await?;
        Ok(Client {
            stream: Box::new(t),
            buf: Vec::new(),
            ca: ca.clone(),
        })
    }

    pub(crate) async fn tls_alpn(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr).await?;
        let t = client_tls(ca, alpn)
            .connect(ServerName::try_from("localhost").unwrap(), s)
            .await?;
        Ok(Client {
            stream: Box::new(t),
            buf: Vec::new(),
            ca: ca.clone(),
        })
    }

    /// Upgrades after a STARTTLS OK. Any unread buffered bytes are a test failure.
    pub(crate) async fn starttls(self) -> std::io::Result<Client> {
        assert!(
            self.buf.is_empty(),
            "bytes after STARTTLS OK: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let t = client_tls(&self.ca, &[])
            .connect(ServerName::try_from("localhost").unwrap(), self.stream)
            .await?;
        Ok(Client {
            stream: Box::new(t),
            buf: Vec::new(),
            ca: self.ca,
        })
    }

    pub(crate) async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends and tolerates a peer that already closed.
    pub(crate) async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        self.stream.write_all(bytes.as_ref()).await?;
        self.stream.flush().await
    }

    async fn fill(&mut self, timeout: Duration) -> std::io::Result<usize> {
        let mut tmp = vec![0u8; 64 * 1024];
        match tokio::time::timeout(timeout, self.stream.read(&mut tmp)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "read timed out",
            )),
        }
    }

    /// One line (CRLF included); None at EOF.
    pub(crate) async fn line(&mut self) -> Option<String> {
        self.line_within(READ_TIMEOUT).await
    }

    pub(crate) async fn line_within(&mut self, timeout: Duration) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            match self.fill(timeout).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => panic!(
                    "no line within {timeout:?}; have {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Err(_) => return None,
            }
        }
    }

    /// Reads exactly n bytes (literal payloads).
    pub(crate) async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let got = self.fill(READ_TIMEOUT).await.unwrap();
            assert!(got > 0, "EOF in literal");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads lines until the tagged reply for `tag`; returns all lines (the tagged one last).
    pub(crate) async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self
                .line()
                .await
                .unwrap_or_else(|| panic!("EOF before {tag} reply; got {lines:?}"));
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// Sends a command and returns the lines up to its tagged reply.
    pub(crate) async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n")).await;
        self.until_tagged(tag).await
    }

    /// True if the peer closed (EOF or reset) within the timeout, draining anything before.
    pub(crate) async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.fill(left).await {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }

    /// Whatever bytes are buffered, or the next read's (for binary protocols such as COMPRESS).
    pub(crate) async fn raw(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            let n = self.fill(READ_TIMEOUT).await.unwrap();
            assert!(n > 0, "EOF");
        }
        std::mem::take(&mut self.buf)
    }

    /// Everything received so far and not consumed.
    pub(crate) fn pending(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

pub(crate) fn last(lines: &[String]) -> &str {
    lines.last().map(String::as_str).unwrap_or("")
}

/// A gateway under test, in this process.
pub(crate) struct TestGateway {
    pub gw: Gateway,
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub dovecot: Arc<Dovecot>,
    pub users_file: PathBuf,
    /// user → app password (grouped form).
    pub passwords: Vec<(String, String)>,
    /// user → TOTP secret, for users enrolled at start.
    pub totp: Vec<(String, Secret)>,
    pub config_yaml: String,
    /// The same config, written to a file (for CLI runs).
    pub config_path: PathBuf,
    /// The portal's public URL (`https://localhost:PORT`), when it was started.
    pub portal_url: Option<String>,
}

/// What a test may change in the config.
#[derive(Clone)]
pub(crate) struct Options {
    pub limits: String,
    pub failure_floor: &'static str,
    pub extra_users: Vec<String>,
    pub backend_login: &'static str,
    pub backend_tls: &'static str,
    /// Verify the backend against a CA that did not sign its certificate.
    pub wrong_backend_ca: bool,
    /// The `auth.mfa` mapping.
    pub mfa: &'static str,
    /// More lines of the `auth` section.
    pub auth_extra: &'static str,
    /// Trust the test IdP as an OAuth issuer, with these extra issuer lines (None: no OAuth).
    pub oauth: Option<&'static str>,
    /// The `guard` section's body (indented two spaces).
    pub guard: String,
    /// Listener lines added to the two standard ones.
    pub extra_listeners: &'static str,
    /// The `state` section's body (indented two spaces); empty: memory.
    pub state: String,
    /// A scripted backend (plain TCP) instead of the real Dovecot.
    pub backend_address: Option<SocketAddr>,
    /// Where the users live (the harness imports its users into a database store).
    pub store: TestStore,
    /// More keys of the `admin` mapping (e.g. `rate_limit: {…}`), after a comma.
    pub admin_extra: &'static str,
    /// `auth.store.poll_interval` of a database store.
    pub store_poll: &'static str,
    /// Start the self-service portal (HTTPS on a free port, the test IdP as its OpenID
    /// provider, registered there as a client for this portal), with these extra lines of the
    /// `portal` mapping (indented two spaces).
    pub portal: Option<&'static str>,
    /// Also front SMTP submission and POP3: listeners `smtps` (implicit TLS), `submission`
    /// (STARTTLS), `pop3s` and `pop3`; backends `postfix` (the harness's Postfix, XCLIENT over
    /// STARTTLS), `dovecot-submission` (Dovecot's submission service, AUTH PLAIN with the
    /// master user as authcid, implicit TLS) and `dovecot-pop3` (master user, implicit TLS).
    /// The value is the SMTP route's default backend.
    pub mail: Option<&'static str>,
}

/// The credential store of a test gateway.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum TestStore {
    /// The users file.
    #[default]
    File,
    /// An SQLite database in the test's directory.
    Sqlite,
    /// A PostgreSQL database (its URL).
    Postgres(String),
}

/// The guard in tests that are not about it: the production budgets, a short tarpit so that
/// tests failing many logins on purpose stay quick.
/// The admin bearer token of test gateways.
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub(crate) const TEST_GUARD: &str = "  tarpit: { start: 100ms, max: 400ms }";

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: String::new(),
            failure_floor: "300ms",
            extra_users: Vec::new(),
            backend_login: "master_user",
            backend_tls: "implicit",
            wrong_backend_ca: false,
            mfa: "{ default: optional }",
            auth_extra: "",
            oauth: None,
            guard: TEST_GUARD.to_owned(),
            extra_listeners: "",
            state: String::new(),
            backend_address: None,
            store: TestStore::File,
            admin_extra: "",
            store_poll: "200ms",
            portal: None,
            mail: None,
        }
    }
}

impl TestGateway {
    pub(crate) async fn start() -> Option<TestGateway> {
        Self::start_with(Options::default()).await
    }

    pub(crate) async fn start_with(opts: Options) -> Option<TestGateway> {
        let dovecot = dovecot()?;
        let oauth_yaml = match opts.oauth {
            None => String::new(),
            Some(extra) => {
                let idp = idp()?;
                format!(
                    "  oauth:\n    issuers:\n      - name: test\n        issuer: \"{}\"\n        audiences: [imap]\n        required_scopes: [imap]\n        leeway: 0s\n        key_refresh_interval: 1s\n{extra}\n",
                    idp.url
                )
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        let (cert, key) = pki.issue("gateway", &["localhost", "127.0.0.1"]);
        let (cert2, key2) = pki.issue("other", &["mail.other.test"]);
        // Users: every Dovecot user with one app password; one disabled user; one whose
        // domain routes to a backend that is down.
        let mut file = UsersFile {
            version: 1,
            users: Default::default(),
        };
        let mut passwords = Vec::new();
        let mut totp = Vec::new();
        let ring_key = imapgate::auth::keyring::generate_key();
        std::fs::write(dir.path().join("k1.key"), ring_key.expose()).unwrap();
        chmod(&dir.path().join("k1.key"), 0o600);
        let ring = {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(ring_key.expose())
                .unwrap();
            imapgate::auth::keyring::KeyRing::new(
                vec![("k1".into(), Secret::new(raw))],
                Some("k1".into()),
            )
        };
        let mut names: Vec<String> = USERS.iter().map(|s| s.to_string()).collect();
        names.push("disabled@example.org".into());
        names.push("zed@down.test".into());
        names.extend(opts.extra_users.iter().cloned());
        for name in &names {
            let pw = app_password::generate();
            let hash = app_password::hash(&pw, TEST_ARGON2).unwrap();
            file.users.insert(
                name.clone(),
                User {
                    disabled: name.starts_with("disabled@"),
                    totp: name.starts_with('m').then(|| {
                        let secret = imapgate::auth::totp::new_secret();
                        let stored = ring.encrypt(name, &secret).unwrap();
                        totp.push((name.clone(), secret));
                        stored
                    }),
                    app_passwords: vec![AppPassword {
                        id: app_password::new_id(),
                        label: "test".into(),
                        hash,
                        lookup: Some(ring.lookup_index(&pw).unwrap()),
                        created: time::OffsetDateTime::now_utc(),
                        expires: None,
                        revoked: false,
                    }],
                    ..Default::default()
                },
            );
            passwords.push((
                name.clone(),
                app_password::grouped(&pw).expose_str().unwrap().to_owned(),
            ));
        }
        let users_file = dir.path().join("users.yaml");
        file.save(&users_file).unwrap();
        let down_port = free_port();
        let backend_addr = match opts.backend_address {
            Some(a) => a,
            None if opts.backend_tls == "starttls" => dovecot.imap,
            None => dovecot.imaps,
        };
        let (portal_yaml, portal_url) = match opts.portal {
            None => (String::new(), None),
            Some(extra) => {
                let idp = idp()?;
                let port = free_port();
                let url = format!("https://localhost:{port}");
                let client_id = format!("portal-{port}");
                let secret_file = dir.path().join("portal-oidc.secret");
                let client_secret = format!("portal-secret-{port}-{}", std::process::id());
                write_secret(&secret_file, &client_secret);
                idp.register_client(&client_id, &client_secret, &format!("{url}/auth/callback"))
                    .await;
                (
                    format!(
                        "portal:\n  address: \"127.0.0.1:{port}\"\n  public_url: \"{url}\"\n  oidc:\n    issuer: \"{issuer}\"\n    client_id: {client_id}\n    client_secret_file: \"{secret}\"\n    scopes: [openid, email, profile, groups]\n    domains: [example.org]\n    admin: {{ claim: groups, values: [mail-admins] }}\n    key_refresh_interval: 1s\n{extra}\n",
                        issuer = idp.url,
                        secret = secret_file.display(),
                    ),
                    Some(url),
                )
            }
        };
        let (mail_listeners, mail_backends, mail_routes) = match opts.mail {
            None => (String::new(), String::new(), String::new()),
            Some(smtp_default) => {
                let p = postfix()?;
                let ca = dovecot.pki.ca_pem.display();
                let master = dovecot.master_secret_file.display();
                (
                    "  - { name: smtps, protocol: smtp, address: \"127.0.0.1:0\", tls: implicit, hostname: gw.example.org }\n  \
                     - { name: submission, protocol: smtp, address: \"127.0.0.1:0\", tls: starttls, hostname: gw.example.org }\n  \
                     - { name: pop3s, protocol: pop3, address: \"127.0.0.1:0\", tls: implicit }\n  \
                     - { name: pop3, protocol: pop3, address: \"127.0.0.1:0\", tls: starttls }\n"
                        .to_owned(),
                    format!(
                        "  - {{ name: postfix, protocol: smtp, address: \"{pf}\", tls: starttls, ca_file: \"{ca}\", server_name: localhost, login: xclient, connect_timeout: 2s, login_timeout: 5s }}\n  \
                         - {{ name: dovecot-submission, protocol: smtp, address: \"{sub}\", tls: implicit, ca_file: \"{ca}\", server_name: localhost, login: sasl_authzid, master_user: gateway, master_password_file: \"{master}\", connect_timeout: 2s, login_timeout: 5s }}\n  \
                         - {{ name: dovecot-pop3, protocol: pop3, address: \"{pop3s}\", tls: implicit, ca_file: \"{ca}\", server_name: localhost, login: master_user, master_user: gateway, master_password_file: \"{master}\", connect_timeout: 2s, login_timeout: 5s }}\n",
                        pf = p.submission,
                        sub = dovecot.submissions,
                        pop3s = dovecot.pop3s,
                    ),
                    format!("  smtp: {{ default: {smtp_default} }}\n"),
                )
            }
        };
        let yaml = format!(
            r#"
{portal_yaml}
listeners:
  - {{ name: imaps, address: "127.0.0.1:0", tls: implicit }}
  - {{ name: imap, address: "127.0.0.1:0", tls: starttls }}
{mail_listeners}{extra_listeners}
guard:
{guard}
state:
{state}
tls:
  certificates:
    - {{ cert_file: "{cert}", key_file: "{key}" }}
    - {{ cert_file: "{cert2}", key_file: "{key2}" }}
limits:
{limits}
auth:
{store_yaml}
  app_password: {{ argon2: {{ m_kib: 1024, t: 1, p: 1 }} }}
  failure_floor: {floor}
  secret_keys: [{{ id: k1, file: "{keyfile}" }}]
  mfa: {mfa}
{auth_extra}
{oauth_yaml}
backends:
  - name: dovecot
    address: "{backend_addr}"
    tls: {backend_tls}
{ca}
    server_name: localhost
    login: {login}
    master_user: gateway
    master_password_file: "{master}"
    send_id: true
    connect_timeout: 2s
    login_timeout: 5s
  - name: down
    address: "127.0.0.1:{down_port}"
    tls: none
    login: master_user
    master_user: gateway
    master_password_file: "{master}"
    connect_timeout: 1s
{mail_backends}routes:
  default: dovecot
  domains: {{ down.test: down }}
{mail_routes}admin: {{ address: "127.0.0.1:0", health_interval: 1s, token_file: "{admin_token}"{admin_extra} }}
"#,
            cert = cert.display(),
            key = key.display(),
            cert2 = cert2.display(),
            key2 = key2.display(),
            limits = if opts.limits.is_empty() {
                "  max_connections: 1000".to_owned()
            } else {
                opts.limits.clone()
            },
            store_yaml = match &opts.store {
                TestStore::File => format!("  users_file: \"{}\"", users_file.display()),
                TestStore::Sqlite => format!(
                    "  store: {{ backend: sqlite, sqlite: {{ path: \"{}\" }}, poll_interval: {} }}",
                    dir.path().join("imapgate.db").display(),
                    opts.store_poll
                ),
                TestStore::Postgres(url) => {
                    let p = dir.path().join("pg.url");
                    write_secret(&p, url);
                    format!(
                        "  store: {{ backend: postgres, postgres: {{ url_file: \"{}\" }}, poll_interval: {} }}",
                        p.display(),
                        opts.store_poll
                    )
                }
            },
            floor = opts.failure_floor,
            mfa = opts.mfa,
            keyfile = dir.path().join("k1.key").display(),
            auth_extra = opts.auth_extra,
            ca = match (opts.backend_tls, opts.wrong_backend_ca) {
                ("none", _) => String::new(),
                (_, true) => format!("    ca_file: \"{}\"", pki.ca_pem.display()),
                (_, false) => format!("    ca_file: \"{}\"", dovecot.pki.ca_pem.display()),
            },
            master = dovecot.master_secret_file.display(),
            login = opts.backend_login,
            backend_tls = opts.backend_tls,
            extra_listeners = opts.extra_listeners,
            admin_token = {
                let p = dir.path().join("admin.token");
                std::fs::write(&p, format!("{ADMIN_TOKEN}\n")).unwrap();
                chmod(&p, 0o600);
                p.display().to_string()
            },
            guard = opts.guard,
            admin_extra = opts.admin_extra,
            state = if opts.state.is_empty() {
                "  backend: memory".to_owned()
            } else {
                opts.state.clone()
            },
        );
        // Loaded from its file, as the binary does: reloads read the file again.
        let config_path = dir.path().join("imapgate.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        let config =
            Config::load(&config_path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        if opts.store != TestStore::File {
            let store = imapgate::store::open(&config.auth).await.unwrap();
            store.import(&file, true).await.unwrap();
        }
        let gw = Gateway::start(config).await.unwrap();
        Some(TestGateway {
            totp,
            config_path,
            gw,
            dir,
            pki,
            dovecot,
            users_file,
            passwords,
            config_yaml: yaml,
            portal_url,
        })
    }

    /// The TOTP code of an enrolled user, `steps` time steps from now.
    pub(crate) fn code(&self, user: &str, steps: i64) -> String {
        let secret = &self.totp.iter().find(|(u, _)| u == user).unwrap().1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        imapgate::auth::totp::code_at(secret, (now + steps * 30) as u64, 6).unwrap()
    }

    /// LOGIN over implicit TLS from `local` (a loopback address such as 127.0.1.1); returns
    /// the tagged reply line.
    pub(crate) async fn login_from(&self, local: &str, user: &str, password: &str) -> String {
        let mut c = Client::tls_from(self.imaps(), local, &self.pki.ca_der).await;
        let g = c.line().await.unwrap();
        assert!(g.starts_with("* OK"), "{g}");
        let r = c.cmd("a", &format!("LOGIN {user} \"{password}\"")).await;
        last(&r).to_owned()
    }

    pub(crate) fn imaps(&self) -> SocketAddr {
        self.gw.listener("imaps").unwrap()
    }

    pub(crate) fn imap(&self) -> SocketAddr {
        self.gw.listener("imap").unwrap()
    }

    /// A listener's address by name (`smtps`, `submission`, `pop3s`, `pop3` with `mail`).
    pub(crate) fn addr(&self, name: &str) -> SocketAddr {
        self.gw.listener(name).unwrap()
    }

    pub(crate) fn password(&self, user: &str) -> String {
        self.passwords
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.clone())
            .unwrap()
    }

    pub(crate) async fn client(&self) -> Client {
        let mut c = Client::tls(self.imaps(), &self.pki.ca_der).await;
        let g = c.line().await.unwrap();
        assert!(g.starts_with("* OK [CAPABILITY "), "{g}");
        c
    }

    /// A logged-in client (LOGIN over implicit TLS).
    pub(crate) async fn logged_in(&self, user: &str) -> Client {
        let mut c = self.client().await;
        let r = c
            .cmd("L1", &format!("LOGIN {user} \"{}\"", self.password(user)))
            .await;
        assert!(last(&r).starts_with("L1 OK"), "{r:?}");
        c
    }

    /// A metric's value summed over the series whose labels contain all of `labels`.
    pub(crate) async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = http_get(self.gw.admin, "/metrics").await.1;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Direct client to the shared Dovecot, logged in as `user` via the master user.
pub(crate) async fn dovecot_direct(d: &Dovecot, user: &str) -> Client {
    let mut c = Client::tls(d.imaps, &d.pki.ca_der).await;
    let g = c.line().await.unwrap();
    assert!(g.starts_with("* OK"), "{g}");
    let r = c
        .cmd(
            "D1",
            &format!("LOGIN \"{user}*gateway\" \"{}\"", d.master_password),
        )
        .await;
    assert!(last(&r).starts_with("D1 OK"), "{r:?}");
    c
}

/// A tiny HTTP/1.1 GET; returns (status, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path, None).await
}

/// An admin request with the test bearer token (or `token`); returns status and body.
pub(crate) async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Appends a message to `user`'s INBOX straight on Dovecot; returns nothing.
pub(crate) async fn append_direct(d: &Dovecot, user: &str, message: &[u8]) {
    let mut c = dovecot_direct(d, user).await;
    c.send(format!("A1 APPEND INBOX {{{}}}\r\n", message.len()))
        .await;
    let cont = c.line().await.unwrap();
    assert!(cont.starts_with('+'), "{cont}");
    c.send(message).await;
    c.send(b"\r\n").await;
    let r = c.until_tagged("A1").await;
    assert!(last(&r).starts_with("A1 OK"), "{r:?}");
    c.cmd("A2", "LOGOUT").await;
}

/// A secret of the test's own, to search logs for.
pub(crate) fn secret(s: &str) -> Secret {
    Secret::from_slice(s.as_bytes())
}

/// The shared test identity provider (npm `oidc-provider`, tests/idp): one per test binary.
pub(crate) struct Idp {
    pub url: String,
    _child: std::sync::Mutex<std::process::Child>,
}

static IDP: OnceLock<Option<Arc<Idp>>> = OnceLock::new();

/// The shared IdP, started on first use; `None` (skip) when Node or its packages are missing
/// and real components are not required.
pub(crate) fn idp() -> Option<Arc<Idp>> {
    IDP.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        let ready = which("node").is_some() && dir.join("node_modules/oidc-provider").is_dir();
        if !ready {
            assert!(
                !require_real(),
                "the test IdP needs node and `npm ci` in tests/idp (IMAPGATE_REQUIRE_REAL=1)"
            );
            eprintln!("skipping: node or tests/idp/node_modules missing");
            return None;
        }
        // Its stderr goes to a file, named in the failure if it does not start.
        let log =
            std::env::temp_dir().join(format!("imapgate-test-idp-{}.log", std::process::id()));
        let mut child = Command::new("node")
            .arg(dir.join("server.js"))
            .args(["--port", "0", "--exit-with-stdin", "--jwks-max-age", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Generous: a loaded 2-core machine starting many gateways at once.
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| {
                panic!(
                    "IdP did not start ({e}); its stderr ({}):\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let url = line
            .trim()
            .strip_prefix("READY ")
            .expect("IdP READY line")
            .to_owned();
        Some(Arc::new(Idp {
            url,
            _child: std::sync::Mutex::new(child),
        }))
    })
    .clone()
}

impl Idp {
    /// An access token from the client-credentials grant (`client` is alice, bob or mia).
    pub(crate) async fn token(&self, client: &str, resource: &str, scope: &str) -> String {
        let resp = reqwest::Client::new()
            .post(format!("{}/token", self.url))
            .basic_auth(client, Some(format!("secret-{client}")))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("resource", resource),
            ])
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "token request failed: {}",
            resp.status()
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    /// Registers a confidential code-flow client (the portal of one test gateway).
    pub(crate) async fn register_client(&self, id: &str, secret: &str, redirect_uri: &str) {
        let resp = reqwest::Client::new()
            .post(format!("{}/__clients", self.url))
            .json(&serde_json::json!({
                "client_id": id,
                "client_secret": secret,
                "redirect_uris": [redirect_uri],
            }))
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "client registration failed: {}",
            resp.status()
        );
    }

    /// Rotates the provider's signing keys (new `kid`s).
    pub(crate) async fn rotate(&self) {
        let resp = reqwest::Client::new()
            .post(format!("{}/__rotate", self.url))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
}

/// The real `imapgate` binary, run with a test gateway's configuration on fixed free ports,
/// JSON logs at debug level in `dir/stderr.log` and the audit log in `dir/audit.log`.
pub(crate) struct Binary {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub imaps: u16,
    pub imap: u16,
    pub admin: u16,
    /// The portal's port (another than the in-process gateway's), when it has one.
    pub portal: Option<u16>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_binary(t: &TestGateway) -> Binary {
    start_binary_with(t, None)
}

/// [`start_binary`] with this `logging:` line instead (`{dir}` stands for the binary's
/// directory), e.g. another audit sink or format.
pub(crate) fn start_binary_with(t: &TestGateway, logging: Option<&str>) -> Binary {
    let b = spawn_binary(t, logging, &[]);
    wait_for_admin(&b);
    b
}

/// [`start_binary_with`] with these extra environment variables, returning as soon as the
/// process is spawned (its ports may not be bound yet).
pub(crate) fn spawn_binary(
    t: &TestGateway,
    logging: Option<&str>,
    env: &[(&str, &std::ffi::OsStr)],
) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let (imaps, imap, admin) = (free_port(), free_port(), free_port());
    // The portal moves to a port of its own too (its address and public URL).
    let portal = t.portal_url.as_ref().map(|u| {
        let old: u16 = u.rsplit(':').next().unwrap().parse().unwrap();
        (old, free_port())
    });
    let config = match portal {
        Some((old, new)) => t
            .config_yaml
            .replace(&format!(":{old}\""), &format!(":{new}\"")),
        None => t.config_yaml.clone(),
    };
    let yaml = config
        .replacen(
            "127.0.0.1:0\", tls: implicit",
            &format!("127.0.0.1:{imaps}\", tls: implicit"),
            1,
        )
        .replacen(
            "127.0.0.1:0\", tls: starttls",
            &format!("127.0.0.1:{imap}\", tls: starttls"),
            1,
        )
        .replacen(
            "address: \"127.0.0.1:0\", health_interval",
            &format!("address: \"127.0.0.1:{admin}\", health_interval"),
            1,
        )
        + &match logging {
            Some(l) => l.replace("{dir}", &dir.path().display().to_string()) + "\n",
            None => format!(
                "logging: {{ format: json, level: debug, audit: \"{}\" }}\n",
                dir.path().join("audit.log").display()
            ),
        };
    let cfg = dir.path().join("imapgate.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["check-config", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "-c"])
        .arg(&cfg)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    Binary {
        child,
        dir,
        imaps,
        imap,
        admin,
        portal: portal.map(|(_, new)| new),
    }
}

/// Waits (up to 10 s) until the binary's admin port accepts.
fn wait_for_admin(b: &Binary) {
    for i in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", b.admin)).is_ok() {
            break;
        }
        assert!(
            i < 99,
            "binary did not start: {}",
            std::fs::read_to_string(b.dir.path().join("stderr.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A throwaway `rsyslogd` (Debian's `rsyslog`) listening on TCP 127.0.0.1:`port` with its own
/// config, pid file and spool dir; every message is written to `out` as
/// `PRI|VERSION|APP-NAME|PROCID|MSGID|MSG`. Never the system service. Stopped on drop.
pub(crate) struct Rsyslog {
    pub port: u16,
    pub out: PathBuf,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Rsyslog {
    /// None (skip) when rsyslogd is missing, unless IMAPGATE_REQUIRE_REAL=1 (then fail).
    pub(crate) fn start(port: u16) -> Option<Rsyslog> {
        Self::start_with(port, None)
    }

    /// [`Rsyslog::start`] with a TLS input (RFC 5425; rsyslog's `ossl` driver from Debian's
    /// `rsyslog-openssl`) serving this certificate and key, not asking for a client one.
    pub(crate) fn start_tls(port: u16, cert: &Path, key: &Path, ca: &Path) -> Option<Rsyslog> {
        let driver = [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib",
        ]
        .iter()
        .any(|d| Path::new(d).join("rsyslog/lmnsd_ossl.so").is_file());
        if !driver {
            assert!(
                !require_real(),
                "rsyslog-openssl is required (IMAPGATE_REQUIRE_REAL=1) but not installed"
            );
            eprintln!("skipping: rsyslog-openssl not installed");
            return None;
        }
        Self::start_with(port, Some((cert, key, ca)))
    }

    fn start_with(port: u16, tls: Option<(&Path, &Path, &Path)>) -> Option<Rsyslog> {
        if !have("rsyslogd") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("spool")).unwrap();
        let out = d.join("out.log");
        let conf = d.join("rsyslog.conf");
        let (global_tls, module_tls) = match tls {
            None => (String::new(), ""),
            Some((cert, key, ca)) => (
                format!(
                    " defaultNetstreamDriver=\"ossl\" defaultNetstreamDriverCAFile=\"{}\" \
                     defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\"",
                    ca.display(),
                    cert.display(),
                    key.display()
                ),
                " streamDriver.name=\"ossl\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\"",
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{spool}\"{global_tls})\n\
                 module(load=\"imtcp\"{module_tls})\n\
                 input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\")\n\
                 template(name=\"fields\" type=\"string\" string=\"%pri%|%protocol-version%|%app-name%|%procid%|%msgid%|%msg%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{out}\" template=\"fields\")\n",
                spool = d.join("spool").display(),
                out = out.display(),
            ),
        )
        .unwrap();
        let child = Command::new(which("rsyslogd").unwrap())
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        for i in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                i < 99,
                "rsyslogd did not listen: {}",
                std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Rsyslog {
            port,
            out,
            _dir: dir,
            child,
        })
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared Dovecot's POP3, LMTP and submission services: their config and their ports.
struct MailServices {
    conf: String,
    pop3: SocketAddr,
    pop3s: SocketAddr,
    lmtp: SocketAddr,
    submission: SocketAddr,
    submissions: SocketAddr,
}

impl MailServices {
    fn addrs(&self) -> [SocketAddr; 5] {
        [
            self.pop3,
            self.pop3s,
            self.lmtp,
            self.submission,
            self.submissions,
        ]
    }
}

/// Config appended to the shared Dovecot's (after its IMAP part, which it leaves alone).
fn mail_services_conf() -> MailServices {
    let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (pop3, pop3s, lmtp, submission, submissions) = (port(), port(), port(), port(), port());
    let relay = mail_ports().smtp;
    let conf = format!(
        "# POP3, LMTP and submission for the SMTP/POP3 tests (issue 21).\n\
         # POP3 UIDs like Dovecot's default; no lock, so IMAP and POP3 tests can share a box.\n\
         pop3_uidl_format = %08Xu%08Xv\n\
         service pop3-login {{\n  inet_listener pop3 {{\n    port = {pop3p}\n  }}\n  \
         inet_listener pop3s {{\n    port = {pop3sp}\n    ssl = yes\n  }}\n}}\n\
         # LMTP on loopback TCP: Postfix delivers @example.org here (lmtp:inet:127.0.0.1:PORT).\n\
         # The static userdb checks that a recipient exists with a passdb lookup.\n\
         service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {lmtpp}\n  }}\n}}\n\
         # Submission relays to the harness's Postfix smtpd; Dovecot connects only after a\n\
         # login, so Postfix need not be up first.\n\
         hostname = localhost\n\
         submission_relay_host = 127.0.0.1\nsubmission_relay_port = {relay}\n\
         submission_relay_ssl = no\nsubmission_relay_trusted = no\n\
         service submission-login {{\n  inet_listener submission {{\n    port = {subp}\n  }}\n  \
         inet_listener submissions {{\n    port = {subsp}\n    ssl = yes\n  }}\n}}\n",
        pop3p = pop3.port(),
        pop3sp = pop3s.port(),
        lmtpp = lmtp.port(),
        subp = submission.port(),
        subsp = submissions.port(),
    );
    MailServices {
        conf,
        pop3,
        pop3s,
        lmtp,
        submission,
        submissions,
    }
}

/// The harness's Postfix ports, chosen once per test binary before either server starts
/// (Dovecot's submission relays to `smtp`; Postfix delivers to Dovecot's LMTP).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MailPorts {
    /// Postfix smtpd, an MX-style port: accepts mail for `@example.org` from anyone.
    pub smtp: u16,
    /// Postfix smtpd, a submission-style port for the gateway: XCLIENT from 127.0.0.0/8, no
    /// SASL of its own, and nothing but XCLIENT-authenticated sessions may send.
    pub submission: u16,
}

static MAIL_PORTS: OnceLock<MailPorts> = OnceLock::new();

pub(crate) fn mail_ports() -> MailPorts {
    *MAIL_PORTS.get_or_init(|| MailPorts {
        smtp: free_port(),
        submission: free_port(),
    })
}

/// The shared Postfix: a non-system instance (its own config, queue and data directories in
/// a temporary directory; never /etc/postfix, never port 25), one per test binary, delivering
/// `@example.org` to the shared Dovecot's LMTP. Its daemons run as the package's `postfix`
/// user; `master` runs as root (it must), so the tests run as root, as Dovecot's do.
pub(crate) struct Postfix {
    /// The temporary directory: `conf/` (main.cf, master.cf), `queue/`, `data/`, `maillog`.
    pub dir: PathBuf,
    pub conf_dir: PathBuf,
    /// smtpd, MX-style: mail for `@example.org` from anyone, no XCLIENT.
    pub smtp: SocketAddr,
    /// smtpd for the gateway: XCLIENT from 127.0.0.0/8 (`LOGIN=` shows as the authenticated
    /// sender, `ADDR=` as the client), no SASL of its own, STARTTLS offered with a certificate
    /// of the shared Dovecot's test CA (`Dovecot::pki`).
    pub submission: SocketAddr,
    /// Postfix's own log (`maillog_file`, written by its `postlog` service; no syslog).
    pub maillog: PathBuf,
    /// From `postfix check` until both smtpd ports accepted.
    pub started_in: Duration,
}

static POSTFIX: OnceLock<Option<Arc<Postfix>>> = OnceLock::new();

/// The shared Postfix, started on first use (after the shared Dovecot, whose LMTP it delivers
/// to); `None` (skip) when Postfix or Dovecot is missing and real components are not required.
pub(crate) fn postfix() -> Option<Arc<Postfix>> {
    POSTFIX
        .get_or_init(|| {
            let d = dovecot()?;
            if !have("postfix") {
                return None;
            }
            Some(Arc::new(Postfix::start(&d, mail_ports())))
        })
        .clone()
}

impl Postfix {
    fn start(d: &Dovecot, ports: MailPorts) -> Postfix {
        let began = std::time::Instant::now();
        // Short: the watchdog below names it; 0755 so the postfix user reaches queue/.
        let dir = tempfile::Builder::new()
            .prefix("igp")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        chmod(&dir, 0o755);
        let (conf_dir, queue, data) = (dir.join("conf"), dir.join("queue"), dir.join("data"));
        for p in [&conf_dir, &queue, &data] {
            std::fs::create_dir(p).unwrap();
            chmod(p, 0o755);
        }
        // data_directory belongs to postfix (postfix check warns otherwise); the queue's
        // subdirectories are created by `postfix check` with their owners and modes.
        let ok = Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown postfix failed (is the postfix user there?)");
        chmod(&data, 0o700);
        let (cert, key) = d.pki.issue("postfix", &["localhost", "127.0.0.1"]);
        let maillog = dir.join("maillog");
        let lmtp = d.lmtp.port();
        let (smtp, submission) = (ports.smtp, ports.submission);
        let main_cf = format!(
            "# Throwaway Postfix for imapgate's tests: loopback only, everything under {d}.\n\
             compatibility_level = 3.6\n\
             queue_directory = {queue}\ndata_directory = {data}\n\
             mail_owner = postfix\nsetgid_group = postdrop\n\
             myhostname = mx.example.org\nmydomain = example.org\nmyorigin = example.org\n\
             inet_interfaces = loopback-only\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n\
             # example.org is local; every address in it goes to Dovecot's LMTP, which\n\
             # refuses unknown users (so no local_recipient_maps here).\n\
             mydestination = example.org\nlocal_recipient_maps =\n\
             local_transport = lmtp:inet:127.0.0.1:{lmtp}\n\
             alias_maps =\nalias_database =\n\
             # No syslog: Postfix's own postlog service writes this file.\n\
             maillog_file = {maillog}\nmaillog_file_prefixes = {d}\n\
             # Loopback only: no DNS, no reverse lookups.\n\
             smtpd_peername_lookup = no\nsmtp_dns_support_level = disabled\n\
             lmtp_host_lookup = native\nsmtp_host_lookup = native\n\
             smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n\
             smtpd_tls_security_level = may\nsmtpd_tls_session_cache_database =\n\
             # Failures are answered at once (no tarpit), as for Dovecot.\n\
             smtpd_error_sleep_time = 0\n",
            d = dir.display(),
            queue = queue.display(),
            data = data.display(),
            maillog = maillog.display(),
            cert = cert.display(),
            key = key.display(),
        );
        // Services as in Postfix's master.cf.proto, none chrooted, no port 25; and two smtpd
        // listeners on loopback ports chosen at run time.
        let master_cf = format!(
            "127.0.0.1:{smtp} inet n - n - - smtpd\n\
             127.0.0.1:{submission} inet n - n - - smtpd\n\
             \x20 -o syslog_name=postfix/submission\n\
             \x20 -o smtpd_authorized_xclient_hosts=127.0.0.0/8\n\
             \x20 -o smtpd_sasl_auth_enable=no\n\
             \x20 -o smtpd_sasl_authenticated_header=yes\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             tlsmgr unix - - n 1000? 1 tlsmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             proxywrite unix - - n - 1 proxymap\n\
             smtp unix - - n - - smtp\n\
             relay unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             local unix - n n - - local\n\
             lmtp unix - - n - - lmtp\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(conf_dir.join("main.cf"), main_cf).unwrap();
        std::fs::write(conf_dir.join("master.cf"), master_cf).unwrap();
        let bin = which("postfix").unwrap();
        let run = |verb: &str| {
            let out = Command::new(&bin)
                .arg("-c")
                .arg(&conf_dir)
                .arg(verb)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "postfix {verb}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // `check` creates the queue's subdirectories with their owners and modes.
        run("check");
        run("start");
        // Postfix's master daemonizes: a watchdog in a process group of its own (so a Ctrl-C
        // of the test run does not take it along) stops it when this test process ends, then
        // removes its directory. Statics are never dropped.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {bin} -c '{conf}' stop; \
             sleep 1; rm -rf '{dir}'",
            pid = std::process::id(),
            bin = bin.display(),
            conf = conf_dir.display(),
            dir = dir.display(),
        );
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let smtp_addr: SocketAddr = format!("127.0.0.1:{smtp}").parse().unwrap();
        let submission_addr: SocketAddr = format!("127.0.0.1:{submission}").parse().unwrap();
        for i in 0..100 {
            if std::net::TcpStream::connect(smtp_addr).is_ok()
                && std::net::TcpStream::connect(submission_addr).is_ok()
            {
                break;
            }
            assert!(
                i < 99,
                "postfix did not start: {}",
                std::fs::read_to_string(&maillog).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let started_in = began.elapsed();
        eprintln!("postfix started in {started_in:?}");
        Postfix {
            dir,
            conf_dir,
            smtp: smtp_addr,
            submission: submission_addr,
            maillog,
            started_in,
        }
    }

    /// Postfix's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// `postfix -c DIR stop` (master and all its daemons); harmless when already stopped.
    pub(crate) fn stop(&self) {
        if let Some(bin) = which("postfix") {
            let _ = Command::new(bin)
                .arg("-c")
                .arg(&self.conf_dir)
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The shared instance lives in a static and is stopped by its watchdog; an instance held
/// elsewhere stops when dropped (also while a failing test unwinds).
impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}
