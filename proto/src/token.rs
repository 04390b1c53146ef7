//! Client tokens: HMAC-SHA256 over (app, user, expiry) with the app's
//! secret.
//!
//! Claims bytes: `u8 1` (format version), `u8 len + app`, `u8 len + user`,
//! `u64 BE expires_at_unix_secs`. Token text: base64url(claims) "."
//! base64url(mac), both without padding. The format is public
//! (`docs/protocol.md`) so that a business server can mint tokens without
//! this crate.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::frame::BindErrorCode;
use crate::ids::check_user_id;
use crate::limits::{APP_ID_LEN_MAX, TOKEN_LEN_MAX};

/// The first byte of the claims, so that a later format can be told apart.
const TOKEN_FORMAT_VERSION: u8 = 1;

/// Bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// What a token asserts: `user` may bind `app` until `expires_at_unix_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub app: String,
    pub user: String,
    pub expires_at_unix_secs: u64,
}

/// Why a token was refused, in the order `verify_token` checks.
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
    /// The BIND_ERR code to answer with. Only expiry gets its own code: a
    /// client can fix it by fetching a fresh token, while telling a forger
    /// which of the other checks failed would only help the forger.
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
    if app.is_empty() || app.len() > APP_ID_LEN_MAX || check_user_id(&claims.user).is_err() {
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

/// The inverse of `claims_bytes`, with the same limits: a token minted
/// elsewhere with a user id over `USER_ID_LEN_MAX` must be refused here, or
/// the gateway could not encode the BIND_OK that names that user; one with
/// a control character too, since the API refuses such a user id and so
/// could never push to it.
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
    if app.is_empty() || app.len() > APP_ID_LEN_MAX {
        return None;
    }
    let user = String::from_utf8(user.to_vec()).ok()?;
    check_user_id(&user).ok()?;
    Some(TokenClaims {
        app: String::from_utf8(app.to_vec()).ok()?,
        user,
        expires_at_unix_secs: u64::from_be_bytes(expiry),
    })
}

/// Mints a token for `claims`, keyed with the app's secret. `Malformed` if
/// the app id is empty or over its limit, or the user id is not one
/// [`check_user_id`] accepts.
pub fn sign_token(secret: &[u8], claims: &TokenClaims) -> Result<String, TokenError> {
    let bytes = claims_bytes(claims)?;
    let tag = mac(secret, &bytes).finalize().into_bytes();
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&bytes),
        URL_SAFE_NO_PAD.encode(tag)
    ))
}

/// `verify_token` against each of `secrets` (the current one and those a
/// rotation retired whose grace has not ended): the claims of the first that
/// verifies. Otherwise the most telling error: a secret whose signature
/// matches says more than one that does not (the secret is right, the token
/// is not), so `BadSignature` is kept only when every secret gave it.
pub fn verify_token_with_any<'s>(
    secrets: impl IntoIterator<Item = &'s [u8]>,
    app: &str,
    token: &str,
    now_unix_secs: u64,
) -> Result<TokenClaims, TokenError> {
    let mut first_error = None;
    for secret in secrets {
        match verify_token(secret, app, token, now_unix_secs) {
            Ok(claims) => return Ok(claims),
            Err(error) => {
                if first_error.is_none_or(|first| first == TokenError::BadSignature) {
                    first_error = Some(error);
                }
            }
        }
    }
    Err(first_error.unwrap_or(TokenError::BadSignature))
}

/// Checks a BIND's token for `app` and returns its claims. The checks run in
/// this order, and the first that fails is the error: form and length
/// (`Malformed`), signature (`BadSignature`, compared in constant time), app
/// (`WrongApp`), expiry (`Expired` once `now_unix_secs >= expires_at`). The
/// claims are parsed before the signature is checked, but nothing in them is
/// trusted until it is.
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
    if tag.len() != TAG_LEN {
        return Err(TokenError::Malformed);
    }
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
    use crate::limits::USER_ID_LEN_MAX;

    fn claims() -> TokenClaims {
        TokenClaims {
            app: "chat".into(),
            user: "alice".into(),
            expires_at_unix_secs: 1_000,
        }
    }

    /// Signs arbitrary claims bytes, to build tokens `sign_token` refuses to.
    fn sign_raw(secret: &[u8], bytes: &[u8]) -> String {
        let tag = mac(secret, bytes).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(bytes),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The worked example in `docs/protocol.md`, which a business server
    /// minting its own tokens can check itself against.
    #[test]
    fn golden_token() {
        const GOLDEN: &str =
            "AQRjaGF0BWFsaWNlAAAAAAAAA-g.ZMiKgNGtJ5Q0st0hv7vVTKVSBJIj69ZGs3-GWAlKkfk";
        assert_eq!(sign_token(b"secret", &claims()).unwrap(), GOLDEN);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
        let doc = std::fs::read_to_string(path).expect("docs/protocol.md");
        assert!(doc.contains(&format!("token   {GOLDEN}")));
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let token = sign_token(b"secret", &claims()).unwrap();
        assert_eq!(verify_token(b"secret", "chat", &token, 0), Ok(claims()));
        assert_eq!(verify_token(b"secret", "chat", &token, 999), Ok(claims()));
        assert_eq!(
            verify_token(b"secret", "chat", &token, 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify_token(b"secret", "chat", &token, u64::MAX),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn the_longest_claims_fit_in_a_bind() {
        let longest = TokenClaims {
            app: "a".repeat(APP_ID_LEN_MAX),
            user: "u".repeat(USER_ID_LEN_MAX),
            expires_at_unix_secs: u64::MAX,
        };
        let token = sign_token(b"secret", &longest).unwrap();
        assert!(token.len() <= TOKEN_LEN_MAX);
        assert_eq!(
            verify_token(b"secret", &longest.app, &token, 0),
            Ok(longest)
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

        // Claims of another token under this token's tag.
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

        // One bit of the expiry flipped, tag kept.
        let (claims_text, tag_text) = token.split_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(claims_text).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        let tampered = format!("{}.{tag_text}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(
            verify_token(b"secret", "chat", &tampered, 0),
            Err(TokenError::BadSignature)
        );

        // One bit of the tag flipped.
        let mut tag = URL_SAFE_NO_PAD.decode(tag_text).unwrap();
        tag[0] ^= 0x80;
        let tampered = format!("{claims_text}.{}", URL_SAFE_NO_PAD.encode(&tag));
        assert_eq!(
            verify_token(b"secret", "chat", &tampered, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let token = sign_token(b"secret", &claims()).unwrap();
        // Signature before app, app before expiry.
        assert_eq!(
            verify_token(b"other", "news", &token, 5_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify_token(b"secret", "news", &token, 5_000),
            Err(TokenError::WrongApp)
        );
        // Form before signature.
        assert_eq!(
            verify_token(b"other", "chat", &format!("{token}="), 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn claims_sign_token_refuses_are_refused_when_minted_elsewhere() {
        let mut long_user = vec![TOKEN_FORMAT_VERSION, 4];
        long_user.extend_from_slice(b"chat");
        long_user.push(u8::try_from(USER_ID_LEN_MAX + 1).unwrap());
        long_user.extend_from_slice(&[b'u'; USER_ID_LEN_MAX + 1]);
        long_user.extend_from_slice(&1_000u64.to_be_bytes());

        let mut trailing = claims_bytes(&claims()).unwrap();
        trailing.push(0);

        let mut wrong_version = claims_bytes(&claims()).unwrap();
        wrong_version[0] = 2;

        let mut bad_utf8 = claims_bytes(&claims()).unwrap();
        bad_utf8[2] = 0xff;

        let empty_app = [TOKEN_FORMAT_VERSION, 0, 1, b'u', 0, 0, 0, 0, 0, 0, 0, 9];

        let mut nul_in_user = vec![TOKEN_FORMAT_VERSION, 4];
        nul_in_user.extend_from_slice(b"chat");
        nul_in_user.extend_from_slice(&[3, b'a', 0, b'b']);
        nul_in_user.extend_from_slice(&1_000u64.to_be_bytes());

        for bytes in [
            &long_user[..],
            &nul_in_user,
            &trailing,
            &wrong_version,
            &bad_utf8,
            &empty_app,
        ] {
            assert_eq!(
                verify_token(b"secret", "chat", &sign_raw(b"secret", bytes), 0),
                Err(TokenError::Malformed),
                "{bytes:?}"
            );
        }

        // A tag of the wrong length cannot be an HMAC-SHA256 tag at all.
        let token = sign_token(b"secret", &claims()).unwrap();
        let (claims_text, tag_text) = token.split_once('.').unwrap();
        let tag = URL_SAFE_NO_PAD.decode(tag_text).unwrap();
        let short = format!("{claims_text}.{}", URL_SAFE_NO_PAD.encode(&tag[..31]));
        assert_eq!(
            verify_token(b"secret", "chat", &short, 0),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let token = sign_token(b"secret", &claims()).unwrap();
        let padded = format!("{token}{}", "A".repeat(TOKEN_LEN_MAX));
        for garbage in [
            "",
            ".",
            "abc",
            "a.b.c",
            "!!!.???",
            "AQRjaGF0BWFsaWNlAAAAAAAAA-g",
            &"x".repeat(2_000),
            &padded,
            &token.replace('.', ".."),
        ] {
            assert_eq!(
                verify_token(b"secret", "chat", garbage, 0),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn sign_refuses_ids_outside_their_limits() {
        for (app, user) in [
            (String::new(), "alice".to_owned()),
            ("chat".to_owned(), String::new()),
            ("a".repeat(APP_ID_LEN_MAX + 1), "alice".to_owned()),
            ("chat".to_owned(), "u".repeat(USER_ID_LEN_MAX + 1)),
            ("chat".to_owned(), "a\0b".to_owned()),
            ("chat".to_owned(), "line\nbreak".to_owned()),
        ] {
            let claims = TokenClaims {
                app,
                user,
                expires_at_unix_secs: 1,
            };
            assert_eq!(sign_token(b"s", &claims), Err(TokenError::Malformed));
        }
    }

    #[test]
    fn only_expiry_has_its_own_bind_error_code() {
        assert_eq!(
            TokenError::Expired.bind_error_code(),
            BindErrorCode::TOKEN_EXPIRED
        );
        for error in [
            TokenError::Malformed,
            TokenError::BadSignature,
            TokenError::WrongApp,
        ] {
            assert_eq!(error.bind_error_code(), BindErrorCode::INVALID_TOKEN);
        }
    }
}
