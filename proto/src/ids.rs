//! Identifiers: the shared forms of app and user ids that travel between
//! the planes, and the accepted forms that more than one part of Herald
//! checks (the HTTP API, tokens, `herald token`), so that every part accepts
//! exactly the same ones.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::limits::USER_ID_LEN_MAX;

/// Declares an id that is a shared string: cloning it counts a reference
/// instead of copying bytes, it reads as a `&str`, and a map keyed by it is
/// looked up by `&str` (hash and equality are the string's).
macro_rules! shared_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> $name {
                $name(Arc::from(id))
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> $name {
                $name(Arc::from(id))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

shared_id! {
    /// An app id. The gateway's app table holds one per app and every
    /// binding, command and event about the app shares it; the control
    /// plane makes one per app when it starts and shares it among every
    /// call's store and deliveries, so a push copies no app id.
    AppId
}

shared_id! {
    /// A user id, as it travels between the planes (in events, register
    /// changes), shared by the event and what the control plane keeps of it.
    UserId
}

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
