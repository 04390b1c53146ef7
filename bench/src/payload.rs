//! The payload every scenario sends: the send time first, which the
//! workers read back on receipt to time it end to end on one clock.

/// The fewest bytes a payload can be: the send time in unix nanoseconds
/// (19 digits until the year 2286) and the space after it.
pub const PAYLOAD_BYTES_MIN: usize = 20;

/// `len` bytes: the send time (unix ns) in decimal, a space, and `x` up
/// to `len`. Never shorter than the time and its space.
pub fn timestamped(sent_nanos: u128, len: usize) -> Vec<u8> {
    let mut payload = format!("{sent_nanos} ").into_bytes();
    let len = len.max(payload.len());
    payload.resize(len, b'x');
    payload
}

/// Parses `--payload-bytes`: at least [`PAYLOAD_BYTES_MIN`].
pub fn parse_len(text: &str) -> Result<usize, String> {
    let len: usize = text.parse().map_err(|error| format!("{error}"))?;
    if len < PAYLOAD_BYTES_MIN {
        return Err(format!(
            "at least {PAYLOAD_BYTES_MIN} bytes: the send time (19 digits) and a space lead \
             every payload"
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_the_send_time_padded_to_its_length() {
        let now = 1_764_571_234_567_890_123u128;
        for len in [PAYLOAD_BYTES_MIN, 256, 4096] {
            let payload = timestamped(now, len);
            assert_eq!(payload.len(), len);
            assert!(payload.starts_with(b"1764571234567890123 "));
            assert!(payload[PAYLOAD_BYTES_MIN..].iter().all(|&b| b == b'x'));
        }
    }

    #[test]
    fn the_send_time_is_never_cut() {
        assert_eq!(timestamped(1_234, 2), b"1234 ".to_vec());
    }

    #[test]
    fn a_length_shorter_than_the_send_time_is_refused() {
        assert_eq!(parse_len("256"), Ok(256));
        assert!(parse_len("19").is_err());
        assert!(parse_len("big").is_err());
    }
}
