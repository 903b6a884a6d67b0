//! A throwaway PostgreSQL cluster (Debian's `postgresql`), started once per test binary as an
//! unprivileged user in a temporary directory on a free loopback port, removed when the test
//! process ends; each test gets a database of its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::harness::{free_port, require_real};

pub(crate) struct Postgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    next: AtomicU32,
}

static PG: OnceLock<Option<Arc<Postgres>>> = OnceLock::new();

/// The directory of `initdb`/`postgres` (Debian keeps them per major version).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").is_file() && p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// The shared cluster; `None` (skip) when PostgreSQL is not installed and not required.
pub(crate) fn postgres() -> Option<Arc<Postgres>> {
    PG.get_or_init(|| match bin_dir() {
        Some(bin) => Some(Arc::new(start(bin))),
        None => {
            assert!(
                !require_real(),
                "PostgreSQL (Debian's postgresql) is required (IMAPGATE_REQUIRE_REAL=1)"
            );
            eprintln!("skipped: PostgreSQL is not installed");
            None
        }
    })
    .clone()
}

/// Runs `cmd` as `nobody` (PostgreSQL refuses to run as root).
fn as_nobody(cmd: &std::path::Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(cmd);
    c
}

fn start(bin: PathBuf) -> Postgres {
    let dir = tempfile::Builder::new()
        .prefix("igpg")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    let ok = Command::new("chown")
        .args(["nobody:nogroup"])
        .arg(&dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown nobody failed");
    let data = dir.join("data");
    let out = as_nobody(&bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // In the foreground under a shell that stops it when this test process ends, then removes
    // the cluster.
    let script = format!(
        "setpriv --reuid=nobody --regid=nogroup --clear-groups -- {pg} -D {data} -p {port} -k {dir} \
         -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
         -c max_connections=300 >{dir}/postgres.log 2>&1 & P=$!; \
         while kill -0 {me} 2>/dev/null && kill -0 $P 2>/dev/null; do sleep 1; done; \
         kill -INT $P 2>/dev/null; wait $P; rm -rf '{dir}'",
        pg = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        me = std::process::id(),
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let pg = Postgres {
        port,
        dir: dir.clone(),
        bin,
        next: AtomicU32::new(1),
    };
    for i in 0..200 {
        if pg.psql("postgres", "SELECT 1").is_ok() {
            return pg;
        }
        assert!(
            i < 199,
            "postgres did not start: {}",
            std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg
}

impl Postgres {
    /// Runs one SQL command with psql as the superuser; stdout.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let psql = self.bin.join("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A new, empty database; its URL.
    pub(crate) fn database(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    #[allow(dead_code)]
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}
