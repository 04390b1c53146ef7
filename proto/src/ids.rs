//! The accepted forms of identifiers that more than one part of Herald
//! checks (the HTTP API, tokens, `herald token`), so that every part accepts
//! exactly the same ones.

use crate::limits::USER_ID_LEN_MAX;

/// Checks a user id: 1 to [`USER_ID_LEN_MAX`] bytes of UTF-8 without control
/// characters (U+0000 to U+001F, U+007F to U+009F). Any other character is
/// allowed, `/` included, and ids are compared byte for byte: no Unicode
/// normalisation, so `é` written precomposed and decomposed are two users.
///
/// Control characters are refused because user ids end up in logs, webhook
/// JSON and Redis keys, where a NUL or a line break would truncate or forge
/// lines.
pub fn check_user_id(user: &str) -> Result<(), &'static str> {
    if user.is_empty() || user.len() > USER_ID_LEN_MAX {
        return Err("a user id must be 1 to 128 bytes of UTF-8");
    }
    if user.chars().any(char::is_control) {
        return Err(
            "a user id must not contain control characters (U+0000 to U+001F, U+007F to U+009F)",
        );
    }
    Ok(())
}

// The message above names the limit; keep them in step.
const _: () = assert!(USER_ID_LEN_MAX == 128);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_of_any_printable_unicode_are_accepted() {
        for user in [
            "alice",
            "a/b",
            "élodie",
            "用户",
            "🙂",
            "a b",
            "x".repeat(128).as_str(),
        ] {
            assert_eq!(check_user_id(user), Ok(()), "{user:?}");
        }
        // 4-byte characters up to the byte limit, not the character count.
        assert!(check_user_id(&"🙂".repeat(32)).is_ok());
        assert!(check_user_id(&"🙂".repeat(33)).is_err());
    }

    #[test]
    fn empty_long_and_control_characters_are_refused() {
        assert!(check_user_id("").is_err());
        assert!(check_user_id(&"x".repeat(129)).is_err());
        for user in ["a\0b", "a\nb", "\t", "a\u{7f}", "a\u{85}b", "\u{9f}"] {
            assert!(check_user_id(user).is_err(), "{user:?}");
        }
    }
}
