//! SASL PLAIN (RFC 4616) as a strict pure function: decoded bytes in, typed credential out.
//!
//! `[authzid] NUL authcid NUL passwd`. The gateway does not let one identity act for another:
//! an authzid that differs from the authcid is refused (an empty authzid, or one equal to the
//! authcid, is accepted). Every field must be UTF-8; authcid and password must be non-empty;
//! NUL may not appear inside a field (so exactly two NULs).

use crate::secret::Secret;

/// A decoded PLAIN message.
#[derive(Debug, PartialEq, Eq)]
pub struct Plain {
    pub user: String,
    pub password: Secret,
}

/// Why a PLAIN message was refused (all answered the same way to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    #[error("malformed PLAIN message")]
    Malformed,
    #[error("authorization identity differs from authentication identity")]
    AuthzidMismatch,
    #[error("not UTF-8")]
    NotUtf8,
    #[error("empty user or password")]
    Empty,
}

/// Decodes the (already base64-decoded) PLAIN message.
pub fn decode_plain(msg: &[u8]) -> Result<Plain, PlainError> {
    let mut parts = msg.split(|b| *b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Malformed);
    };
    let authzid = std::str::from_utf8(authzid).map_err(|_| PlainError::NotUtf8)?;
    let authcid = std::str::from_utf8(authcid).map_err(|_| PlainError::NotUtf8)?;
    std::str::from_utf8(passwd).map_err(|_| PlainError::NotUtf8)?;
    if authcid.is_empty() || passwd.is_empty() {
        return Err(PlainError::Empty);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(PlainError::AuthzidMismatch);
    }
    Ok(Plain {
        user: authcid.to_owned(),
        password: Secret::from_slice(passwd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = |u: &str| Ok::<_, PlainError>(u.to_owned());
        let cases: &[(&[u8], Result<String, PlainError>)] = &[
            (b"\0alice\0pw", ok("alice")),
            (b"alice\0alice\0pw", ok("alice")),
            (b"bob\0alice\0pw", Err(PlainError::AuthzidMismatch)),
            (b"", Err(PlainError::Malformed)),
            (b"alice", Err(PlainError::Malformed)),
            (b"\0alice", Err(PlainError::Malformed)),
            (b"\0alice\0pw\0", Err(PlainError::Malformed)),
            (b"\0alice\0p\0w", Err(PlainError::Malformed)),
            (b"\0\0pw", Err(PlainError::Empty)),
            (b"\0alice\0", Err(PlainError::Empty)),
            (b"\0al\xffice\0pw", Err(PlainError::NotUtf8)),
            (b"\0alice\0p\xffw", Err(PlainError::NotUtf8)),
        ];
        for (input, want) in cases {
            let got = decode_plain(input).map(|p| p.user);
            assert_eq!(&got, want, "input {input:?}");
        }
        let p = decode_plain(b"\0alice\0secret").unwrap();
        assert!(p.password.ct_eq(b"secret"));
    }
}
