//! The validation context: collects every problem with its YAML path, reads secret files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::units::{parse_duration, parse_size, Scalar};
use super::FieldError;
use crate::secret::Secret;

pub(super) struct Ctx<'a> {
    pub(super) base: &'a Path,
    pub(super) errors: Vec<FieldError>,
    pub(super) warnings: Vec<String>,
    /// Secret files read, with their YAML paths: their modes are checked at the end, once
    /// `auth.allow_group_readable_secrets` is known.
    pub(super) secret_files: Vec<(String, PathBuf)>,
}

impl Ctx<'_> {
    pub(super) fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn decode<T: DeserializeOwned>(&mut self, v: &Value, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let full = match inner.as_str() {
                    "." | "" => path.to_owned(),
                    p if p.starts_with('[') => format!("{path}{p}"),
                    p => format!("{path}.{p}"),
                };
                self.err(full, e.into_inner().to_string());
                None
            }
        }
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn duration(
        &mut self,
        v: Option<&Scalar>,
        path: &str,
        default: Duration,
    ) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(&s.0).unwrap_or_else(|m| {
                self.err(path, m);
                default
            }),
        }
    }

    pub(super) fn size(
        &mut self,
        v: Option<&Scalar>,
        path: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> usize {
        let Some(s) = v else { return default };
        match parse_size(&s.0) {
            Ok(n) if (min as u64..=max as u64).contains(&n) => {
                usize::try_from(n).unwrap_or(default)
            }
            Ok(_) => {
                self.err(path, format!("must be between {min} and {max} bytes"));
                default
            }
            Err(m) => {
                self.err(path, m);
                default
            }
        }
    }

    pub(super) fn count(&mut self, v: Option<u32>, path: &str, default: u32) -> u32 {
        match v {
            Some(0) => {
                self.err(path, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    /// Checks `<path>.name`: a valid name (see [`valid_name`]) that is not in `seen` yet; a
    /// valid name is then added to `seen`.
    pub(super) fn unique_name(&mut self, path: &str, name: &str, seen: &mut BTreeSet<String>) {
        if !valid_name(name) {
            self.err(
                format!("{path}.name"),
                "must be 1-32 characters of a-z, 0-9, - or _",
            );
        } else if !seen.insert(name.to_owned()) {
            self.err(format!("{path}.name"), format!("`{name}` is used twice"));
        }
    }

    /// A secret given by exactly one of two keys under `path`: `keys[0]` names a file (read with
    /// [`Ctx::secret_file`]), `keys[1]` an environment variable, which must be set and not empty.
    pub(super) fn secret_file_or_env(
        &mut self,
        path: &str,
        keys: [&str; 2],
        file: Option<&str>,
        env: Option<&str>,
    ) -> Option<Secret> {
        let [file_key, env_key] = keys;
        match (file, env) {
            (Some(f), None) => self.secret_file(f, &format!("{path}.{file_key}")),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::from(v)),
                _ => {
                    self.err(
                        format!("{path}.{env_key}"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            _ => {
                self.err(
                    path,
                    format!("needs exactly one of {file_key} or {env_key}"),
                );
                None
            }
        }
    }

    /// Reads a secret from a file: one value, a trailing newline ignored, never empty, at most
    /// [`MAX_SECRET_FILE`] bytes (a path such as /dev/zero must not exhaust memory).
    pub(super) fn secret_file(&mut self, file: &str, path: &str) -> Option<Secret> {
        let full = self.path(file);
        match read_bounded(&full, MAX_SECRET_FILE) {
            Ok(None) => {
                self.err(
                    path,
                    format!("{} is larger than {MAX_SECRET_FILE} bytes", full.display()),
                );
                None
            }
            Ok(Some(mut bytes)) => {
                while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                    bytes.pop();
                }
                let s = Secret::new(bytes);
                if s.is_empty() {
                    self.err(path, format!("{} is empty", full.display()));
                    None
                } else {
                    self.secret_files.push((path.to_owned(), full));
                    Some(s)
                }
            }
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }
}

/// The largest secret file the config accepts (a password, a token or a Redis URL).
pub(super) const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads at most `limit` bytes; `None` when the file holds more.
pub(super) fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

pub(super) fn items<'v>(cx: &mut Ctx, v: &'v Value, path: &str, required: bool) -> &'v [Value] {
    match v {
        Value::Array(a) if !a.is_empty() || !required => a,
        Value::Array(_) => {
            cx.err(path, "needs at least one entry");
            &[]
        }
        Value::Null if required => {
            cx.err(path, "is required");
            &[]
        }
        Value::Null => &[],
        _ => {
            cx.err(path, "must be a list");
            &[]
        }
    }
}

pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
