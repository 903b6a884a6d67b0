//! The [`Store`] in Redis, for several replicas.
//!
//! Every operation is one round trip and atomic on the server: GCRA, counters with a TTL set at
//! creation and capped sets are small Lua scripts (sent once, then called by their SHA);
//! markers are `SET … NX PX`. Time for GCRA comes from Redis (`TIME`), so replicas with skewed
//! clocks share one timeline. Every key has a TTL and the configured prefix. Listing
//! (`scan_prefix`, operators only) uses `SCAN`, never `KEYS`, and is never on a login's path.
//!
//! Errors never carry the URL (it may hold a password) or a reply's text: only the kind.
//!
//! Every key has a TTL, so any `maxmemory-policy` but `noeviction` (the `volatile-*` ones
//! included) lets Redis drop a used-code marker before it expires, and the code could be
//! replayed. [`RedisStore::eviction`] reads the policy (`CONFIG GET`, or `INFO memory` where
//! `CONFIG` is disabled, as on managed Redis) for `imapgate doctor` and `/readyz`.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, RedisError, Script};

use super::{Rate, RateDecision, Store, StoreError};
use crate::config::RedisConfig;

/// Members per set at most, as in memory.
const MAX_SET_MEMBERS: usize = 10_000;

/// GCRA in milliseconds of server time. ARGV: interval, tolerance. Returns 0 when allowed, else
/// how long until the next event would be.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if allow_at > now then return allow_at - now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, new_tat - now))
return 0
",
    )
});

/// INCRBY with the TTL set when the counter is created. ARGV: by, ttl ms.
static INCR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
",
    )
});

/// SADD under a member cap, refreshing the TTL; returns the size. ARGV: member, ttl ms, cap.
static SET_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('SADD', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('SCARD', KEYS[1])
",
    )
});

/// Whether Redis may drop the gateway's keys before their TTL ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// `maxmemory-policy noeviction`, or no `maxmemory`: a key leaves only when its TTL ends
    /// (when memory is full, writes fail instead, and the gateway treats Redis as failing).
    Never,
    /// `maxmemory` is set and the policy (named here) may evict: every gateway key has a TTL,
    /// so `volatile-*` policies can drop markers too.
    Possible(&'static str),
    /// Redis answered, but refused both `CONFIG GET` and `INFO` (ACL or renamed commands).
    Unknown,
}

/// The policy names Redis knows (never the server's own text, which is echoed nowhere).
fn policy_name(s: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "noeviction",
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
    ];
    let s = s.trim();
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(s))
        .copied()
        .unwrap_or("an unrecognised policy")
}

/// The verdict from `maxmemory` (bytes, 0 = no limit) and the policy; `None` when unreadable.
fn eviction_of(maxmemory: Option<&str>, policy: Option<&str>) -> Option<Eviction> {
    let policy = policy_name(policy?);
    if policy == "noeviction" {
        return Some(Eviction::Never);
    }
    let limit: u64 = maxmemory?.trim().parse().ok()?;
    Some(if limit == 0 {
        Eviction::Never
    } else {
        Eviction::Possible(policy)
    })
}

/// `maxmemory` and `maxmemory_policy` from the text of `INFO memory`.
fn eviction_from_info(info: &str) -> Option<Eviction> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    eviction_of(field("maxmemory"), field("maxmemory_policy"))
}

/// The server answered with an error (refused, unknown command), as opposed to a connection
/// that failed.
fn refused_by_server(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

fn err(e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {:?}", e.kind()))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Prepares the connection; it is made on first use, so start-up does not wait for Redis.
    pub fn new(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let url = cfg
            .url
            .expose_str()
            .ok_or_else(|| StoreError::Unavailable("redis: the URL is not UTF-8".into()))?;
        let client = match &cfg.ca_file {
            Some(f) => {
                let pem = std::fs::read(f).map_err(|e| {
                    StoreError::Unavailable(format!("redis: cannot read {}: {e}", f.display()))
                })?;
                Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => Client::open(url),
        }
        .map_err(|e| err(&e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| err(&e))?;
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| err(&e)),
            Err(_) => Err(StoreError::Unavailable("redis: timed out".into())),
        }
    }

    /// Reads whether Redis may evict keys: `CONFIG GET maxmemory*`, or `INFO memory` where
    /// `CONFIG` is refused. An error only when Redis cannot be reached.
    pub async fn eviction(&self) -> Result<Eviction, StoreError> {
        let mut c = self.conn.clone();
        let config = tokio::time::timeout(self.timeout, async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory*")
                .query_async::<std::collections::HashMap<String, String>>(&mut c)
                .await
        })
        .await
        .map_err(|_| StoreError::Unavailable("redis: timed out".into()))?;
        match config {
            Ok(map) => {
                let field = |k: &str| map.get(k).map(String::as_str);
                if let Some(e) = eviction_of(field("maxmemory"), field("maxmemory-policy")) {
                    return Ok(e);
                }
            }
            Err(e) if refused_by_server(&e) => {}
            Err(e) => return Err(err(&e)),
        }
        let mut c = self.conn.clone();
        let info = tokio::time::timeout(self.timeout, async move {
            redis::cmd("INFO")
                .arg("memory")
                .query_async::<String>(&mut c)
                .await
        })
        .await
        .map_err(|_| StoreError::Unavailable("redis: timed out".into()))?;
        match info {
            Ok(text) => Ok(eviction_from_info(&text).unwrap_or(Eviction::Unknown)),
            Err(e) if refused_by_server(&e) => Ok(Eviction::Unknown),
            Err(e) => Err(err(&e)),
        }
    }

    /// One round trip that proves the server answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        self.run(async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }
}

/// `SCAN MATCH` treats `*?[\` specially: escape them in the literal prefix.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn rate_check(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        let interval = rate.period / rate.burst.max(1);
        let tolerance = rate.period.saturating_sub(interval);
        let mut c = self.conn.clone();
        let k = self.key(key);
        let wait: u64 = self
            .run(async move {
                GCRA.key(k)
                    .arg(ms(interval))
                    .arg(u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if wait == 0 {
            RateDecision::Allowed
        } else {
            RateDecision::Limited(Duration::from_millis(wait))
        })
    }

    async fn incr(&self, key: &str, by: u64, ttl: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        self.run(async move { INCR.key(k).arg(by).arg(ms(ttl)).invoke_async(&mut c).await })
            .await
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        let v = value.to_owned();
        let set: Option<String> = self
            .run(async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(v)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    async fn set_add_count(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        let m = member.to_owned();
        self.run(async move {
            SET_ADD
                .key(k)
                .arg(m)
                .arg(ms(ttl))
                .arg(MAX_SET_MEMBERS)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        let v = value.to_owned();
        self.run(async move {
            redis::cmd("SET")
                .arg(k)
                .arg(v)
                .arg("PX")
                .arg(ms(ttl))
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get_many(&[key.to_owned()])
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// `MGET`: one round trip; keys of another type read as absent (never an error).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let ks: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        self.run(async move { redis::cmd("MGET").arg(ks).query_async(&mut c).await })
            .await
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Duration)>, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        // Bounded: at most `limit` keys and 1000 SCAN calls.
        for _ in 0..1000 {
            let mut c = self.conn.clone();
            let p = pattern.clone();
            let (next, batch): (u64, Vec<String>) = self
                .run(async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(p)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= limit {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys.truncate(limit);
        let mut out = Vec::new();
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
            }
            let mut c = self.conn.clone();
            // GET on a set fails the pipeline; sets are never listed (blocks are strings).
            let values: Vec<(Option<String>, i64)> = match self
                .run(async move { pipe.query_async(&mut c).await })
                .await
            {
                Ok(v) => v,
                Err(_) => continue,
            };
            for (k, (v, ttl)) in chunk.iter().zip(values) {
                if let (Some(v), Ok(ttl)) = (v, u64::try_from(ttl)) {
                    let short = k.strip_prefix(&self.prefix).unwrap_or(k).to_owned();
                    out.push((short, v, Duration::from_millis(ttl)));
                }
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delete_many(&[key.to_owned()]).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let ks: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        self.run(async move { redis::cmd("DEL").arg(ks).query_async::<()>(&mut c).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::{eviction_from_info, eviction_of, Eviction};

    #[test]
    fn eviction_is_read_from_maxmemory_and_the_policy() {
        assert_eq!(
            eviction_of(Some("0"), Some("allkeys-lru")),
            Some(Eviction::Never)
        );
        assert_eq!(
            eviction_of(Some("1048576"), Some("noeviction")),
            Some(Eviction::Never)
        );
        assert_eq!(eviction_of(None, Some("noeviction")), Some(Eviction::Never));
        assert_eq!(
            eviction_of(Some("1048576"), Some("volatile-ttl")),
            Some(Eviction::Possible("volatile-ttl"))
        );
        assert_eq!(
            eviction_of(Some("1048576"), Some("made-up <script>")),
            Some(Eviction::Possible("an unrecognised policy"))
        );
        assert_eq!(eviction_of(Some("1048576"), None), None);
        assert_eq!(eviction_of(None, Some("allkeys-lru")), None);
        let info = "# Memory\r\nused_memory:912\r\nmaxmemory:1048576\r\nmaxmemory_human:1.00M\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(
            eviction_from_info(info),
            Some(Eviction::Possible("allkeys-lru"))
        );
        assert_eq!(eviction_from_info("# Memory\r\n"), None);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(super::glob_escape("imapgate:g:block:"), "imapgate:g:block:");
    }
}
