//! SASL decoders as strict pure functions: decoded bytes in, typed credential out.
//! PLAIN (RFC 4616), OAUTHBEARER (RFC 7628) and Google's XOAUTH2.
//!
//! PLAIN:
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

/// The largest bearer token accepted (Entra ID tokens are large; the AUTHENTICATE line has its
/// own 24 KiB limit).
pub const MAX_TOKEN: usize = 16 * 1024;

/// A bearer token and the user the client claims (`user=` / `a=`).
#[derive(Debug, PartialEq, Eq)]
pub struct Bearer {
    pub user: Option<String>,
    pub token: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("malformed message")]
    Malformed,
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not a Bearer token")]
    Scheme,
    #[error("empty token")]
    Empty,
    #[error("token too large")]
    TooLarge,
    #[error("channel binding is not supported")]
    ChannelBinding,
}

/// `auth=Bearer <token>` → the token (scheme case-insensitive, RFC 6750 b64token characters).
fn bearer_token(value: &[u8]) -> Result<Secret, BearerError> {
    let (scheme, token) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (
            value.get(..i).unwrap_or(&[]),
            value.get(i + 1..).unwrap_or(&[]),
        ),
        None => return Err(BearerError::Scheme),
    };
    if !scheme.eq_ignore_ascii_case(b"Bearer") {
        return Err(BearerError::Scheme);
    }
    if token.is_empty() {
        return Err(BearerError::Empty);
    }
    if token.len() > MAX_TOKEN {
        return Err(BearerError::TooLarge);
    }
    let b64token = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b);
    if !token.iter().all(b64token) {
        return Err(BearerError::Malformed);
    }
    Ok(Secret::from_slice(token))
}

fn utf8(b: &[u8]) -> Result<String, BearerError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| BearerError::NotUtf8)
}

/// XOAUTH2: `user=<user>^Aauth=Bearer <token>^A^A`.
pub fn decode_xoauth2(msg: &[u8]) -> Result<Bearer, BearerError> {
    let body = msg
        .strip_suffix(b"\x01\x01")
        .ok_or(BearerError::Malformed)?;
    let mut fields = body.split(|b| *b == 1);
    let (Some(user), Some(auth), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(BearerError::Malformed);
    };
    let user = user.strip_prefix(b"user=").ok_or(BearerError::Malformed)?;
    let auth = auth.strip_prefix(b"auth=").ok_or(BearerError::Malformed)?;
    if user.is_empty() {
        return Err(BearerError::Malformed);
    }
    Ok(Bearer {
        user: Some(utf8(user)?),
        token: bearer_token(auth)?,
    })
}

/// OAUTHBEARER (RFC 7628 §3.1): `n,a=<user>,^Ahost=…^Aport=…^Aauth=Bearer <token>^A^A`.
/// The GS2 header must be `n` (or `y`: client supports channel binding, server does not);
/// `p=` (channel binding required) is refused. `a=` is optional and uses the saslname escapes
/// `=2C` (,) and `=3D` (=).
pub fn decode_oauthbearer(msg: &[u8]) -> Result<Bearer, BearerError> {
    let body = msg
        .strip_suffix(b"\x01\x01")
        .ok_or(BearerError::Malformed)?;
    let split = body
        .iter()
        .position(|b| *b == 1)
        .ok_or(BearerError::Malformed)?;
    let (gs2, rest) = body.split_at(split);
    let kvpairs = rest.get(1..).unwrap_or(&[]);
    // gs2-header = gs2-cbind-flag "," [authzid] ","
    let mut parts = gs2.splitn(3, |b| *b == b',');
    let (Some(flag), Some(authzid), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(BearerError::Malformed);
    };
    match flag {
        b"n" | b"y" => {}
        f if f.starts_with(b"p=") => return Err(BearerError::ChannelBinding),
        _ => return Err(BearerError::Malformed),
    }
    if !tail.is_empty() {
        return Err(BearerError::Malformed);
    }
    let user = if authzid.is_empty() {
        None
    } else {
        let name = authzid.strip_prefix(b"a=").ok_or(BearerError::Malformed)?;
        let name = utf8(name)?;
        // saslname: "=" only as =2C or =3D.
        let mut out = String::with_capacity(name.len());
        let mut chars = name.split('=');
        out.push_str(chars.next().unwrap_or_default());
        for piece in chars {
            match piece.get(..2) {
                Some("2C") => out.push(','),
                Some("3D") => out.push('='),
                _ => return Err(BearerError::Malformed),
            }
            out.push_str(piece.get(2..).unwrap_or_default());
        }
        if out.is_empty() {
            return Err(BearerError::Malformed);
        }
        Some(out)
    };
    let mut token = None;
    for kv in kvpairs.split(|b| *b == 1) {
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or(BearerError::Malformed)?;
        let (key, value) = kv.split_at(eq);
        let value = value.get(1..).unwrap_or(&[]);
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(BearerError::Malformed);
        }
        if key == b"auth" {
            if token.is_some() {
                return Err(BearerError::Malformed);
            }
            token = Some(bearer_token(value)?);
        }
    }
    Ok(Bearer {
        user,
        token: token.ok_or(BearerError::Malformed)?,
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

    type Decoded = Result<(Option<String>, String), BearerError>;

    /// A decoder's answer as the tables write it: the user and the token as text.
    fn decoded(r: Result<Bearer, BearerError>) -> Decoded {
        r.map(|b| {
            let token = String::from_utf8(b.token.expose().to_vec()).unwrap();
            (b.user, token)
        })
    }

    #[test]
    fn xoauth2_table() {
        let ok = |u: &str, t: &str| Ok::<_, BearerError>((Some(u.to_owned()), t.to_owned()));
        let cases: &[(&[u8], Decoded)] = &[
            (
                b"user=alice@example.org\x01auth=Bearer abc.def-ghi\x01\x01",
                ok("alice@example.org", "abc.def-ghi"),
            ),
            (b"user=alice\x01auth=bearer t0k\x01\x01", ok("alice", "t0k")),
            (
                b"user=alice\x01auth=Bearer abc\x01",
                Err(BearerError::Malformed),
            ),
            (
                b"user=alice\x01auth=Basic abc\x01\x01",
                Err(BearerError::Scheme),
            ),
            (
                b"user=alice\x01auth=Bearer \x01\x01",
                Err(BearerError::Empty),
            ),
            (
                b"user=alice\x01auth=Bearer a b\x01\x01",
                Err(BearerError::Malformed),
            ),
            (
                b"user=\x01auth=Bearer abc\x01\x01",
                Err(BearerError::Malformed),
            ),
            (b"auth=Bearer abc\x01\x01", Err(BearerError::Malformed)),
            (
                b"user=al\xffice\x01auth=Bearer abc\x01\x01",
                Err(BearerError::NotUtf8),
            ),
            (b"", Err(BearerError::Malformed)),
        ];
        for (input, want) in cases {
            assert_eq!(&decoded(decode_xoauth2(input)), want, "{input:?}");
        }
        let mut big = b"user=a\x01auth=Bearer ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TOKEN + 1));
        big.extend(b"\x01\x01");
        assert_eq!(decode_xoauth2(&big).unwrap_err(), BearerError::TooLarge);
    }

    #[test]
    fn oauthbearer_table() {
        let ok =
            |u: Option<&str>, t: &str| Ok::<_, BearerError>((u.map(str::to_owned), t.to_owned()));
        let cases: &[(&[u8], Decoded)] = &[
            (b"n,a=alice@example.org,\x01host=imap.example.org\x01port=993\x01auth=Bearer tok\x01\x01", ok(Some("alice@example.org"), "tok")),
            (b"n,,\x01auth=Bearer tok\x01\x01", ok(None, "tok")),
            (b"y,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01", ok(Some("a,b=c"), "tok")),
            (b"p=tls-unique,,\x01auth=Bearer tok\x01\x01", Err(BearerError::ChannelBinding)),
            (b"n,a=alice,\x01host=x\x01\x01", Err(BearerError::Malformed)),
            (b"n,a=alice,\x01auth=Bearer tok\x01auth=Bearer x\x01\x01", Err(BearerError::Malformed)),
            (b"n,a=al=ice,\x01auth=Bearer tok\x01\x01", Err(BearerError::Malformed)),
            (b"n,a=alice\x01auth=Bearer tok\x01\x01", Err(BearerError::Malformed)),
            (b"x,,\x01auth=Bearer tok\x01\x01", Err(BearerError::Malformed)),
            (b"n,,\x01auth=MAC tok\x01\x01", Err(BearerError::Scheme)),
            (b"n,,\x01auth=Bearer tok\x01", Err(BearerError::Malformed)),
            (b"\x01", Err(BearerError::Malformed)),
        ];
        for (input, want) in cases {
            assert_eq!(&decoded(decode_oauthbearer(input)), want, "{input:?}");
        }
    }
}
