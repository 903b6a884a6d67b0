//! `backend: file`: the YAML users file, read and changed under its lock (see
//! `auth::users::UsersFile::update`). The gateway itself reads it through its own snapshot,
//! re-read when the file changes; this is what the CLI and imports use. It has no change log,
//! no session directory and no last-used records: the running gateway keeps its sessions and
//! last-used records in memory, reachable through its admin API only.

use std::path::PathBuf;

use super::{ChangeEvent, ChangeKind, ImportReport, ListQuery, StoreError, UserStore};
use crate::auth::users::{User, UsersFile, CLI_LOCK_WAIT};
use crate::config::StoreBackend;

pub struct FileStore {
    path: PathBuf,
    allow_group_readable: bool,
}

impl FileStore {
    pub fn new(path: PathBuf, allow_group_readable: bool) -> Self {
        Self {
            path,
            allow_group_readable,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn read(&self) -> Result<UsersFile, StoreError> {
        if self.path.exists() {
            if let Err(e) = crate::config::file_mode::check(&self.path, self.allow_group_readable) {
                return Err(StoreError::File(crate::auth::users::UsersError::Exposed(
                    format!("auth.users_file: {e}"),
                )));
            }
        }
        Ok(UsersFile::load_or_empty(&self.path)?)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(PathBuf) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(path))
            .await
            .map_err(|e| StoreError::Unavailable(format!("file task: {e}")))?
    }
}

#[async_trait::async_trait]
impl UserStore for FileStore {
    fn backend(&self) -> StoreBackend {
        StoreBackend::File
    }

    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        Ok(self.read()?.users.remove(name))
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<(String, User)>, StoreError> {
        let file = self.read()?;
        let limit = if q.limit == 0 {
            usize::MAX
        } else {
            q.limit as usize
        };
        Ok(file
            .users
            .into_iter()
            .filter(|(n, _)| q.after.as_deref().is_none_or(|a| n.as_str() > a))
            .filter(|(n, _)| q.search.as_deref().is_none_or(|s| n.contains(s)))
            .take(limit)
            .collect())
    }

    async fn modify(&self, name: &str, change: super::Change<'_>) -> Result<bool, StoreError> {
        // The lock and the write are blocking file operations and the change borrows from its
        // caller: run in place, telling a multi-threaded runtime to move other tasks away.
        let run = || {
            UsersFile::update(&self.path, CLI_LOCK_WAIT, |file| {
                let mut user = file.users.remove(name);
                let before = user.clone();
                let changed = change(&mut user);
                match (&changed, user) {
                    (Ok(true), Some(u)) => {
                        file.users.insert(name.to_owned(), u);
                    }
                    (Ok(true), None) => {}
                    _ => {
                        if let Some(b) = before {
                            file.users.insert(name.to_owned(), b);
                        }
                    }
                }
                changed
            })
        };
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let result = if multi {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
        result.map_err(|e| match e {
            crate::auth::users::UsersError::Refused(m) => StoreError::Refused(m),
            other => StoreError::File(other),
        })
    }

    async fn export(&self) -> Result<UsersFile, StoreError> {
        self.read()
    }

    async fn import(
        &self,
        incoming: &UsersFile,
        replace: bool,
    ) -> Result<ImportReport, StoreError> {
        let incoming = incoming.clone();
        let mut report = ImportReport::default();
        let report = self
            .blocking(move |path| {
                UsersFile::update(&path, CLI_LOCK_WAIT, |file| {
                    for (name, user) in incoming.users {
                        match file.users.get_mut(&name) {
                            Some(_) if !replace => {
                                report.skipped += 1;
                                report.skipped_users.push(name);
                            }
                            Some(existing) => {
                                *existing = user;
                                report.replaced += 1;
                            }
                            None => {
                                file.users.insert(name, user);
                                report.added += 1;
                            }
                        }
                    }
                    Ok(report.added + report.replaced > 0)
                })?;
                Ok(report)
            })
            .await?;
        Ok(report)
    }

    async fn changes_since(
        &self,
        _seq: u64,
        _limit: u32,
    ) -> Result<(Vec<ChangeEvent>, u64), StoreError> {
        Ok((Vec::new(), 0))
    }

    async fn log_event(
        &self,
        _kind: ChangeKind,
        _user: &str,
        _credential: &str,
    ) -> Result<(), StoreError> {
        Err(StoreError::Refused(
            "the file store has no change log: end sessions through the running gateway's admin API".into(),
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read().map(|_| ())
    }

    async fn sessions(&self, _user: Option<&str>) -> Result<Vec<super::SessionInfo>, StoreError> {
        Err(StoreError::Refused(
            "the file store keeps no session directory: sessions are only listed through the running gateway's admin API (--admin URL --token-file FILE)".into(),
        ))
    }

    async fn usage(&self, _user: &str) -> Result<Vec<super::Usage>, StoreError> {
        Err(StoreError::Refused(
            "the file store keeps last-used records in the running gateway's memory only: ask it through its admin API (--admin URL --token-file FILE)".into(),
        ))
    }
}
