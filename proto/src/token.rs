//! Client tokens: HMAC-SHA256 over (app, user, expiry) with the app's
//! secret.
//!
//! Claims bytes: `u8 1` (format version), `u8 len + app`, `u8 len + user`,
//! `u64 BE expires_at_unix_secs`. Token text: base64url(claims) "."
//! base64url(mac), both without padding.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::frame::BindErrorCode;
use crate::limits::{APP_ID_LEN_MAX, TOKEN_LEN_MAX, USER_ID_LEN_MAX};

const TOKEN_FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub app: String,
    pub user: String,
    pub expires_at_unix_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token was issued for another app")]
    WrongApp,
    #[error("token expired")]
    Expired,
}

impl TokenError {
    pub fn bind_error_code(self) -> BindErrorCode {
        match self {
            TokenError::Expired => BindErrorCode::TOKEN_EXPIRED,
            _ => BindErrorCode::INVALID_TOKEN,
        }
    }
}

fn mac(secret: &[u8], claims: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(claims);
    mac
}

fn claims_bytes(claims: &TokenClaims) -> Result<Vec<u8>, TokenError> {
    let (app, user) = (claims.app.as_bytes(), claims.user.as_bytes());
    if app.is_empty()
        || app.len() > APP_ID_LEN_MAX
        || user.is_empty()
        || user.len() > USER_ID_LEN_MAX
    {
        return Err(TokenError::Malformed);
    }
    let mut bytes = Vec::with_capacity(3 + app.len() + user.len() + 8);
    bytes.push(TOKEN_FORMAT_VERSION);
    bytes.push(app.len() as u8);
    bytes.extend_from_slice(app);
    bytes.push(user.len() as u8);
    bytes.extend_from_slice(user);
    bytes.extend_from_slice(&claims.expires_at_unix_secs.to_be_bytes());
    Ok(bytes)
}

fn parse_claims(bytes: &[u8]) -> Option<TokenClaims> {
    let (&version, rest) = bytes.split_first()?;
    if version != TOKEN_FORMAT_VERSION {
        return None;
    }
    let (&app_len, rest) = rest.split_first()?;
    let (app, rest) = rest.split_at_checked(usize::from(app_len))?;
    let (&user_len, rest) = rest.split_first()?;
    let (user, rest) = rest.split_at_checked(usize::from(user_len))?;
    let expiry: [u8; 8] = rest.try_into().ok()?;
    let claims = TokenClaims {
        app: String::from_utf8(app.to_vec()).ok()?,
        user: String::from_utf8(user.to_vec()).ok()?,
        expires_at_unix_secs: u64::from_be_bytes(expiry),
    };
    (!claims.app.is_empty() && !claims.user.is_empty()).then_some(claims)
}

pub fn sign_token(secret: &[u8], claims: &TokenClaims) -> Result<String, TokenError> {
    let bytes = claims_bytes(claims)?;
    let tag = mac(secret, &bytes).finalize().into_bytes();
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&bytes),
        URL_SAFE_NO_PAD.encode(tag)
    ))
}

/// Checks, in order: form, signature, app, expiry (expired once
/// `now >= expires_at`).
pub fn verify_token(
    secret: &[u8],
    app: &str,
    token: &str,
    now_unix_secs: u64,
) -> Result<TokenClaims, TokenError> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(TokenError::Malformed);
    }
    let (claims_text, tag_text) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(claims_text)
        .map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag_text)
        .map_err(|_| TokenError::Malformed)?;
    let claims = parse_claims(&bytes).ok_or(TokenError::Malformed)?;
    mac(secret, &bytes)
        .verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    if claims.app != app {
        return Err(TokenError::WrongApp);
    }
    if now_unix_secs >= claims.expires_at_unix_secs {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            app: "chat".into(),
            user: "alice".into(),
            expires_at_unix_secs: 1_000,
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let token = sign_token(b"secret", &claims()).unwrap();
        assert_eq!(verify_token(b"secret", "chat", &token, 999), Ok(claims()));
        assert_eq!(
            verify_token(b"secret", "chat", &token, 1_000),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn wrong_secret_app_or_tampering_is_refused() {
        let token = sign_token(b"secret", &claims()).unwrap();
        assert_eq!(
            verify_token(b"other", "chat", &token, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify_token(b"secret", "news", &token, 0),
            Err(TokenError::WrongApp)
        );
        let forged = TokenClaims {
            user: "mallory".into(),
            ..claims()
        };
        let forged_claims = sign_token(b"x", &forged).unwrap();
        let spliced = format!(
            "{}.{}",
            forged_claims.split_once('.').unwrap().0,
            token.split_once('.').unwrap().1
        );
        assert_eq!(
            verify_token(b"secret", "chat", &spliced, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        for garbage in ["", ".", "abc", "a.b.c", "!!!.???", &"x".repeat(2_000)] {
            assert_eq!(
                verify_token(b"secret", "chat", garbage, 0),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
        let empty_user = TokenClaims {
            user: String::new(),
            ..claims()
        };
        assert_eq!(sign_token(b"s", &empty_user), Err(TokenError::Malformed));
    }
}
