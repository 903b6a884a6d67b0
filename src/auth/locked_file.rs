//! Writing a file that several processes change: one exclusive lock, then a new file moved
//! into place.
//!
//! Every writer of the users file (the CLI, and the gateway's write-back after a login) goes
//! through [`LockedFile`]:
//! 1. an exclusive `flock` on a sidecar lock file (`.NAME.lock` in the same directory, opened
//!    with `O_NOFOLLOW`, mode 0600, never removed: removing it would let two writers hold locks
//!    on two different files). Waits are bounded: a writer that cannot get the lock in time
//!    gives up with an error instead of hanging;
//! 2. the caller reads the file *after* taking the lock and applies its change to what it read,
//!    so a change made by another writer in between is never undone;
//! 3. [`LockedFile::replace`] writes a new file in the same directory, created with
//!    `O_CREAT|O_EXCL|O_NOFOLLOW` under an unpredictable name (64 random bits) and mode 0600,
//!    fsyncs it, renames it over the old one and fsyncs the directory, so a crash leaves either
//!    the old file or the new one, and a symlink planted at a temporary name is never followed.
//!
//! Readers (the gateway's reload) take no lock: the rename makes every read see a whole file.
//! A read-only file or directory (a mounted Kubernetes Secret) gives [`WriteError::ReadOnly`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::RngExt;

/// How often a waiting writer retries the lock.
const LOCK_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}; the file or its directory is read-only for this user (run the command as the gateway's user, or, for a mounted Kubernetes Secret, edit a copy and replace the Secret)")]
    ReadOnly {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is being changed by another imapgate process (lock {lock} held for more than {waited:?}); try again")]
    Busy {
        path: String,
        lock: String,
        waited: Duration,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl WriteError {
    /// An I/O error on `path`: [`WriteError::ReadOnly`] where the file or its directory cannot
    /// be written.
    fn io(path: &Path, source: std::io::Error) -> Self {
        let path = path.display().to_string();
        if is_read_only(&source) {
            WriteError::ReadOnly { path, source }
        } else {
            WriteError::Io { path, source }
        }
    }
}

/// The exclusive right to replace one file; released on drop (closing the lock file's
/// descriptor releases the `flock`).
pub struct LockedFile {
    path: PathBuf,
    _lock: File,
}

fn is_read_only(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned())
}

/// The sidecar lock file of `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    dir_of(path).join(format!(".{}.lock", file_name(path)))
}

impl LockedFile {
    /// Takes the exclusive lock for `path`, waiting at most `wait`. A file that exists but
    /// cannot be written (mode 0400, a read-only mount) is refused here, before anything else.
    pub fn lock(path: &Path, wait: Duration) -> Result<LockedFile, WriteError> {
        let io = |source| WriteError::io(path, source);
        // Writable at all? Opening for writing changes nothing (no truncation, no data);
        // O_NONBLOCK keeps a FIFO planted at the path from blocking us.
        if path.exists() {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(io)?;
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io)?;
        let started = Instant::now();
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    if started.elapsed() >= wait {
                        return Err(WriteError::Busy {
                            path: path.display().to_string(),
                            lock: lock_path.display().to_string(),
                            waited: wait,
                        });
                    }
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        Ok(LockedFile {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The file this lock guards.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `contents` (see the module documentation for the steps).
    pub fn replace(&self, contents: &[u8]) -> Result<(), WriteError> {
        let tmp = temp_path(&self.path);
        self.replace_via(&tmp, contents)
    }

    /// [`Self::replace`] through a given temporary name (tests plant a symlink there).
    fn replace_via(&self, tmp: &Path, contents: &[u8]) -> Result<(), WriteError> {
        let io = |source| WriteError::io(&self.path, source);
        // O_EXCL: never an existing file, and (with O_CREAT) never through a symlink, which
        // O_NOFOLLOW states once more.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(io)?;
        let written = f
            .write_all(contents)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(tmp, &self.path));
        drop(f);
        if let Err(e) = written {
            let _ = std::fs::remove_file(tmp);
            return Err(io(e));
        }
        // The rename itself is durable only once the directory is.
        File::open(dir_of(&self.path))
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// `.NAME.RANDOM.tmp` beside `path`: 64 random bits, so nobody can plant anything there in
/// advance.
fn temp_path(path: &Path) -> PathBuf {
    let r: u64 = rand::rng().random();
    dir_of(path).join(format!(".{}.{r:016x}.tmp", file_name(path)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A temporary directory with `users.yaml` in it, holding `old`.
    fn users_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        std::fs::write(&path, "old").unwrap();
        (dir, path)
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn replaces_atomically_with_mode_0600_and_leaves_no_temp_file() {
        let (dir, path) = users_file();
        set_mode(&path, 0o644);
        let l = LockedFile::lock(&path, Duration::from_secs(1)).unwrap();
        l.replace(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert_ne!(temp_path(&path), temp_path(&path), "predictable");
    }

    #[test]
    fn a_second_writer_waits_and_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        let held = LockedFile::lock(&path, Duration::from_secs(1)).unwrap();
        let started = Instant::now();
        let second = LockedFile::lock(&path, Duration::from_millis(200));
        assert!(matches!(second, Err(WriteError::Busy { .. })));
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(held);
        assert!(LockedFile::lock(&path, Duration::from_millis(200)).is_ok());
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_not_followed() {
        let (dir, path) = users_file();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let tmp = dir.path().join(".users.yaml.planted.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let l = LockedFile::lock(&path, Duration::from_secs(1)).unwrap();
        assert!(l.replace_via(&tmp, b"new").is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        // Nor one at the lock file's name.
        drop(l);
        std::fs::remove_file(lock_path(&path)).unwrap();
        std::os::unix::fs::symlink(&victim, lock_path(&path)).unwrap();
        assert!(LockedFile::lock(&path, Duration::from_secs(1)).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn read_only_file_or_directory_is_a_clear_error() {
        if running_as_root() {
            // root ignores file modes (a read-only mount still stops it, with the same error).
            return;
        }
        let (dir, path) = users_file();
        set_mode(&path, 0o400);
        let e = LockedFile::lock(&path, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(matches!(e, WriteError::ReadOnly { .. }), "{e}");
        assert!(e.to_string().contains("is read-only for this user"), "{e}");
        set_mode(&path, 0o600);
        set_mode(dir.path(), 0o500);
        let e = LockedFile::lock(&path, Duration::from_secs(1))
            .err()
            .unwrap();
        set_mode(dir.path(), 0o700);
        assert!(matches!(e, WriteError::ReadOnly { .. }), "{e}");
    }

    /// Whether the tests run as root (who may write read-only files).
    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        })
    }
}
