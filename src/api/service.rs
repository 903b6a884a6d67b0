//! The operator actions on users, app passwords and TOTP enrolments, as one set of calls that
//! the admin API (and the CLI through it) use: each validates its input, makes one locked change
//! in the store, and says whether anything changed, so that repeating a call is harmless.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::auth::keyring::KeyRing;
use crate::auth::users::{AppPassword, User};
use crate::auth::{app_password, totp};
use crate::config::{AuthConfig, MfaMode};
use crate::secret::Secret;
use crate::store::{StoreError, UserStore};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(m) if m.starts_with("no user") => ServiceError::NotFound(m),
            StoreError::Refused(m) => ServiceError::Conflict(m),
            StoreError::Invalid(m) => ServiceError::Invalid(m),
            // A read-only mount, or the lock held by another writer too long.
            StoreError::File(e) => {
                ServiceError::Conflict(format!("the users file cannot be changed: {e}"))
            }
            other => ServiceError::Unavailable(other.to_string()),
        }
    }
}

/// Run after a change with the user's name.
pub type ChangeHook = Box<dyn Fn(&str) + Send + Sync>;

/// Whether a call changed something (`false`: it was already so).
pub type Changed = bool;

pub struct Services {
    pub store: Arc<dyn UserStore>,
    auth: AuthConfig,
    ring: KeyRing,
    /// The backends' master-user separators: a name holding one could never log in upstream.
    separators: Vec<String>,
    /// Run after each change with the user's name (the gateway drops what it cached, and with
    /// the users file re-reads it at once instead of at its next poll).
    on_change: Option<ChangeHook>,
}

/// A user as the API shows it: never a hash, a lookup index or a TOTP secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserView {
    pub name: String,
    pub disabled: bool,
    pub upstream_user: String,
    /// `required`, `optional`, `off`, or `default` (auth.mfa.default applies).
    pub mfa: &'static str,
    pub totp_enrolled: bool,
    pub mechanisms: Vec<String>,
    pub allowed_networks: Vec<String>,
    pub app_passwords: Vec<AppPasswordView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AppPasswordView {
    pub id: String,
    pub label: String,
    /// `active`, `revoked` or `expired`.
    pub state: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
}

fn mfa_name(m: Option<MfaMode>) -> &'static str {
    match m {
        None => "default",
        Some(MfaMode::Required) => "required",
        Some(MfaMode::Optional) => "optional",
        Some(MfaMode::Off) => "off",
    }
}

/// `required`, `optional`, `off`, `default` (→ `None`).
pub fn parse_mfa(s: &str) -> Result<Option<MfaMode>, ServiceError> {
    match s {
        "required" => Ok(Some(MfaMode::Required)),
        "optional" => Ok(Some(MfaMode::Optional)),
        "off" => Ok(Some(MfaMode::Off)),
        "default" => Ok(None),
        _ => Err(ServiceError::Invalid(
            "mfa must be required, optional, off or default".into(),
        )),
    }
}

pub fn app_password_view(a: &AppPassword, now: OffsetDateTime) -> AppPasswordView {
    AppPasswordView {
        id: a.id.clone(),
        label: a.label.clone(),
        state: if a.revoked {
            "revoked"
        } else if a.is_active(now) {
            "active"
        } else {
            "expired"
        },
        created: a.created,
        expires: a.expires,
    }
}

pub fn user_view(name: &str, u: &User) -> UserView {
    let now = OffsetDateTime::now_utc();
    UserView {
        name: name.to_owned(),
        disabled: u.disabled,
        upstream_user: u.upstream_user.clone().unwrap_or_else(|| name.to_owned()),
        mfa: mfa_name(u.mfa),
        totp_enrolled: u.totp.is_some(),
        mechanisms: u.mechanisms.clone(),
        allowed_networks: u.allowed_networks.iter().map(ToString::to_string).collect(),
        app_passwords: u
            .app_passwords
            .iter()
            .map(|a| app_password_view(a, now))
            .collect(),
    }
}

/// A new app password: its record (as the API shows it) and the password, shown once.
pub struct NewAppPassword {
    pub view: AppPasswordView,
    pub password: Secret,
}

/// The first step of a TOTP enrolment: the URI for the authenticator app and an opaque token
/// that carries the secret encrypted under the key ring (bound to the user), to be sent back
/// with the first code. Nothing is stored until then.
pub struct Enrolment {
    pub otpauth_uri: Secret,
    pub token: String,
}

impl Services {
    pub fn new(store: Arc<dyn UserStore>, auth: AuthConfig, separators: Vec<String>) -> Self {
        let ring = KeyRing::new(auth.secret_keys.clone(), auth.active_key.clone());
        Self {
            store,
            auth,
            ring,
            separators,
            on_change: None,
        }
    }

    /// Installs the hook run after each change (see the field).
    pub fn on_change(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    fn changed(&self, name: &str, changed: bool) -> bool {
        if changed {
            if let Some(h) = &self.on_change {
                h(name);
            }
        }
        changed
    }

    /// A user name as stored: normalised (the wider Unicode rule the users file accepts).
    pub fn name(&self, user: &str) -> Result<String, ServiceError> {
        crate::auth::normalize_user_with(user, crate::auth::NameRules::Unicode).map_err(|_| {
            ServiceError::Invalid(format!(
                "`{}` is not a valid user name",
                user.escape_debug()
            ))
        })
    }

    pub async fn user(&self, user: &str) -> Result<(String, User), ServiceError> {
        let name = self.name(user)?;
        match self.store.user(&name).await? {
            Some(u) => Ok((name, u)),
            None => Err(ServiceError::NotFound(format!("no user {name}"))),
        }
    }

    /// Adds a user; `Ok(false)` when one exists already with the same settings (a repeated
    /// call), `Conflict` when it exists with others.
    pub async fn add_user(
        &self,
        user: &str,
        upstream_user: Option<String>,
        mfa: Option<MfaMode>,
    ) -> Result<Changed, ServiceError> {
        let name = self.name(user)?;
        if let Some(u) = &upstream_user {
            if crate::auth::normalize_user(u).is_err() {
                return Err(ServiceError::Invalid(
                    "upstream_user is not a valid name".into(),
                ));
            }
        }
        if let Some(sep) = self.separators.iter().find(|s| {
            name.contains(s.as_str())
                || upstream_user
                    .as_deref()
                    .is_some_and(|u| u.contains(s.as_str()))
        }) {
            return Err(ServiceError::Invalid(format!(
                "the name contains the backend's master separator `{sep}`; give an upstream_user"
            )));
        }
        let changed = self
            .store
            .modify(
                &name,
                Box::new(|record| match record {
                    Some(u) if u.upstream_user == upstream_user && u.mfa == mfa => Ok(false),
                    Some(_) => Err(format!("user {name} already exists with other settings")),
                    None => {
                        *record = Some(User {
                            upstream_user,
                            mfa,
                            ..Default::default()
                        });
                        Ok(true)
                    }
                }),
            )
            .await?;
        Ok(self.changed(&name, changed))
    }

    /// Changes a user's settings; each `Some` is applied.
    pub async fn update_user(
        &self,
        user: &str,
        disabled: Option<bool>,
        upstream_user: Option<Option<String>>,
        mfa: Option<Option<MfaMode>>,
    ) -> Result<Changed, ServiceError> {
        let name = self.name(user)?;
        if let Some(Some(u)) = &upstream_user {
            if crate::auth::normalize_user(u).is_err() {
                return Err(ServiceError::Invalid(
                    "upstream_user is not a valid name".into(),
                ));
            }
        }
        let missing = format!("no user {name}");
        let changed = self
            .store
            .modify(
                &name,
                Box::new(move |record| {
                    let u = record.as_mut().ok_or(missing)?;
                    let before = u.clone();
                    if let Some(d) = disabled {
                        u.disabled = d;
                    }
                    if let Some(up) = upstream_user {
                        u.upstream_user = up;
                    }
                    if let Some(m) = mfa {
                        u.mfa = m;
                    }
                    Ok(*u != before)
                }),
            )
            .await?;
        Ok(self.changed(&name, changed))
    }

    /// Removes a user and all their app passwords; `Ok(false)`: there was none.
    pub async fn remove_user(&self, user: &str) -> Result<Changed, ServiceError> {
        let name = self.name(user)?;
        let changed = self
            .store
            .modify(&name, Box::new(|record| Ok(record.take().is_some())))
            .await?;
        Ok(self.changed(&name, changed))
    }

    /// Creates an app password (the hash before the user's lock, so other writers do not wait
    /// for argon2); refused past `auth.max_app_passwords_per_user` active ones.
    pub async fn create_app_password(
        &self,
        user: &str,
        label: &str,
        expires_in: Option<Duration>,
    ) -> Result<NewAppPassword, ServiceError> {
        let name = self.name(user)?;
        if label.chars().any(char::is_control) || label.chars().count() > 64 {
            return Err(ServiceError::Invalid(
                "label must be at most 64 printable characters".into(),
            ));
        }
        if self.auth.active_key.is_none() {
            return Err(ServiceError::Unavailable(
                "auth.secret_keys is empty: app passwords need a key for their lookup index".into(),
            ));
        }
        let password = app_password::generate();
        let params = self.auth.argon2;
        let pw = password.clone();
        let hash = tokio::task::spawn_blocking(move || app_password::hash(&pw, params))
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?
            .map_err(ServiceError::Unavailable)?;
        let lookup = self
            .ring
            .lookup_index(&password)
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let record = AppPassword {
            id: app_password::new_id(),
            label: label.to_owned(),
            hash,
            lookup: Some(lookup),
            created: now,
            expires: expires_in.map(|d| now + d),
            revoked: false,
        };
        let cap = self.auth.max_app_passwords_per_user;
        let stored = record.clone();
        let missing = format!("no user {name}");
        let n = name.clone();
        self.store
            .modify(
                &name,
                Box::new(move |r| {
                    let u = r.as_mut().ok_or(missing)?;
                    let active = u.app_passwords.iter().filter(|a| a.is_active(now)).count();
                    if active >= usize::try_from(cap).unwrap_or(usize::MAX) {
                        return Err(format!(
                            "{n} already has {active} active app passwords, the most auth.max_app_passwords_per_user ({cap}) allows: revoke one first"
                        ));
                    }
                    u.app_passwords.push(stored);
                    Ok(true)
                }),
            )
            .await?;
        self.changed(&name, true);
        Ok(NewAppPassword {
            view: app_password_view(&record, now),
            password,
        })
    }

    /// Revokes an app password; `Ok(false)`: it was revoked already.
    pub async fn revoke_app_password(&self, user: &str, id: &str) -> Result<Changed, ServiceError> {
        let name = self.name(user)?;
        let missing_user = format!("no user {name}");
        let missing = format!("no app password {id}");
        let id = id.to_owned();
        let changed = self
            .store
            .modify(
                &name,
                Box::new(move |r| {
                    let u = r.as_mut().ok_or(missing_user)?;
                    let a = u
                        .app_passwords
                        .iter_mut()
                        .find(|a| a.id == id)
                        .ok_or(missing)?;
                    if a.revoked {
                        return Ok(false);
                    }
                    a.revoked = true;
                    Ok(true)
                }),
            )
            .await;
        match changed {
            Err(StoreError::Refused(m)) if m.starts_with("no ") => Err(ServiceError::NotFound(m)),
            other => Ok(self.changed(&name, other?)),
        }
    }

    /// Starts a TOTP enrolment (see [`Enrolment`]); refused when one exists, unless `force`.
    pub async fn totp_begin(&self, user: &str, force: bool) -> Result<Enrolment, ServiceError> {
        let (name, u) = self.user(user).await?;
        if u.totp.is_some() && !force {
            return Err(ServiceError::Conflict(format!(
                "{name} is already enrolled; reset first (or force)"
            )));
        }
        let secret = totp::new_secret();
        let uri = totp::otpauth_uri(
            &self.auth.mfa.issuer,
            &name,
            &secret,
            self.auth.mfa.code_digits,
        );
        let token = self
            .ring
            .encrypt(&name, &secret)
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        Ok(Enrolment {
            otpauth_uri: uri,
            token,
        })
    }

    /// Completes an enrolment with its token and a first valid code; only then is the secret
    /// stored (replacing an earlier enrolment, which ends its unlock windows).
    pub async fn totp_confirm(
        &self,
        user: &str,
        token: &str,
        code: &str,
    ) -> Result<(), ServiceError> {
        let name = self.name(user)?;
        let secret = self.ring.decrypt(&name, token).map_err(|_| {
            ServiceError::Invalid("the enrolment token is not valid for this user".into())
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if totp::verify(&secret, code.trim(), now, self.auth.mfa.code_digits).is_none() {
            return Err(ServiceError::Invalid(
                "the code does not match (check the device's clock); nothing saved".into(),
            ));
        }
        // Stored as a fresh ciphertext, not the token, so a token seen in transit is not the
        // stored value.
        let stored = self
            .ring
            .encrypt(&name, &secret)
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        let missing = format!("no user {name}");
        self.store
            .modify(
                &name,
                Box::new(move |r| {
                    let u = r.as_mut().ok_or(missing)?;
                    u.totp = Some(stored);
                    Ok(true)
                }),
            )
            .await?;
        self.changed(&name, true);
        Ok(())
    }

    /// Removes a user's TOTP enrolment; `Ok(false)`: there was none.
    pub async fn totp_reset(&self, user: &str) -> Result<Changed, ServiceError> {
        let name = self.name(user)?;
        let missing = format!("no user {name}");
        let changed = self
            .store
            .modify(
                &name,
                Box::new(move |r| {
                    let u = r.as_mut().ok_or(missing)?;
                    Ok(u.totp.take().is_some())
                }),
            )
            .await?;
        Ok(self.changed(&name, changed))
    }
}
