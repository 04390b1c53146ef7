//! WebSocket (RFC 6455) on a gateway connection, sans I/O: the upgrade
//! request (parsed with httparse), then frames in and out of the shard's
//! buffers. A connection keeps two flags between reads; a message split
//! over reads or fragments is assembled in a pooled buffer the caller
//! lends, only while it is incomplete.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, BytesMut};
use herald_proto::transport::WEBSOCKET_PATH as PATH;
use herald_proto::transport::websocket::{
    ACCEPT_GUID, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};
use sha1::{Digest, Sha1};
/// The subprotocol a client may offer.
pub(crate) const SUBPROTOCOL: &str = "herald.v1";
/// Largest upgrade request head.
pub(crate) const HEAD_LEN_MAX: usize = 8 * 1024;
/// Largest message: one whole Herald frame, length prefix included.
pub(crate) const MESSAGE_LEN_MAX: usize =
    herald_proto::limits::LENGTH_PREFIX_LEN + herald_proto::limits::FRAME_BODY_LEN_MAX;
/// Headers an upgrade request may have.
const HEADERS_MAX: usize = 32;

const FIN: u8 = 0x80;
const CONTROL_PAYLOAD_MAX: usize = 125;

/// Close codes (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseCode(pub u16);

impl CloseCode {
    pub(crate) const NORMAL: CloseCode = CloseCode(1000);
    pub(crate) const GOING_AWAY: CloseCode = CloseCode(1001);
    pub(crate) const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub(crate) const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    pub(crate) const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub(crate) const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);

    /// Codes a peer may send in a close frame (RFC 6455 §7.4).
    fn may_be_sent(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

/// What an upgrade request came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// The head is not complete yet.
    Incomplete,
    /// `response` (101) goes out; the WebSocket stream starts `head_len`
    /// bytes into the input.
    Accept { response: Vec<u8>, head_len: usize },
    /// `response` goes out and the connection closes.
    Refuse { status: u16, response: Vec<u8> },
}

/// Reads an upgrade request (RFC 6455 §4.2.1) from the start of `input`.
/// `allowed_origins` empty: any origin; a request with no `Origin` (not
/// from a browser) is never refused for it.
pub(crate) fn upgrade(input: &[u8], allowed_origins: &[String]) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(input) {
        Ok(httparse::Status::Complete(len)) if len <= HEAD_LEN_MAX => len,
        Ok(httparse::Status::Partial) if input.len() < HEAD_LEN_MAX => return Upgrade::Incomplete,
        Ok(_) => return refuse(400, "request head too large", &[]),
        Err(error) => return refuse(400, &format!("not an HTTP request: {error}"), &[]),
    };
    if request
        .path
        .is_none_or(|path| path.split('?').next() != Some(PATH))
    {
        return refuse(404, "the WebSocket endpoint is /v1/connect", &[]);
    }
    if request.method != Some("GET") {
        return refuse(405, "upgrade with GET", &[("Allow", "GET")]);
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|header| header.name.eq_ignore_ascii_case(name))
            .and_then(|header| std::str::from_utf8(header.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return refuse(400, "not a WebSocket upgrade", &[]);
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return refuse(
            426,
            "WebSocket version 13 only",
            &[("Sec-WebSocket-Version", "13")],
        );
    }
    let Some(key) = header("Sec-WebSocket-Key")
        .filter(|key| BASE64.decode(key).is_ok_and(|bytes| bytes.len() == 16))
    else {
        return refuse(400, "Sec-WebSocket-Key must be 16 bytes in base64", &[]);
    };
    // Browsers always say where a page came from; a client that is not a
    // browser (an app, a server) says nothing, and no page can make it
    // connect.
    if let Some(origin) = header("Origin")
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|allowed| allowed == origin)
    {
        return refuse(403, "origin not allowed", &[]);
    }
    let accept = BASE64.encode(Sha1::digest(format!("{key}{ACCEPT_GUID}").as_bytes()));
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n"
    );
    if has_token("Sec-WebSocket-Protocol", SUBPROTOCOL) {
        response.push_str(&format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"));
    }
    response.push_str("\r\n");
    Upgrade::Accept {
        response: response.into_bytes(),
        head_len,
    }
}

fn refuse(status: u16, reason: &str, extra: &[(&str, &str)]) -> Upgrade {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Upgrade Required",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {text}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n",
        reason.len() + 1
    );
    for (name, value) in extra {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str(&format!("\r\n{reason}\n"));
    Upgrade::Refuse {
        status,
        response: response.into_bytes(),
    }
}

/// What a connection remembers between reads: two flags.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WsState {
    /// A fragmented message is in progress; it is text.
    fragmented: Option<bool>,
    /// Our close frame went out: nothing but the peer's close follows.
    pub(crate) close_sent: bool,
}

/// A whole message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Message<'a> {
    pub text: bool,
    pub payload: &'a [u8],
}

/// How reading ended, besides the messages passed on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WsRead {
    /// Input bytes used; the rest is a frame not complete yet.
    pub consumed: usize,
    /// The peer's close frame arrived (and ours, echoing it, is in the
    /// reply unless ours went first): close the connection.
    pub closed: bool,
}

/// Why the connection fails: send a close frame with this code and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WsError {
    pub code: CloseCode,
    pub reason: &'static str,
}

fn fail(code: CloseCode, reason: &'static str) -> WsError {
    WsError { code, reason }
}

/// A frame's header, once whole.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header bytes, then payload bytes.
    header_len: usize,
    payload_len: usize,
}

fn parse_header(input: &[u8]) -> Result<Option<Header>, WsError> {
    let [first, second, ..] = *input else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(fail(CloseCode::PROTOCOL_ERROR, "reserved bits set"));
    }
    if second & 0x80 == 0 {
        return Err(fail(
            CloseCode::PROTOCOL_ERROR,
            "client frames must be masked",
        ));
    }
    let (payload_len, len_bytes) = match second & 0x7F {
        126 => match input.get(2..4) {
            Some(bytes) => (usize::from(u16::from_be_bytes([bytes[0], bytes[1]])), 2),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(bytes) => {
                let len = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(fail(
                        CloseCode::PROTOCOL_ERROR,
                        "payload length's top bit set",
                    ));
                }
                (usize::try_from(len).unwrap_or(usize::MAX), 8)
            }
            None => return Ok(None),
        },
        len => (usize::from(len), 0),
    };
    let mask_at = 2 + len_bytes;
    let Some(mask) = input.get(mask_at..mask_at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: first & FIN != 0,
        opcode: first & 0x0F,
        mask: mask.try_into().expect("4 bytes"),
        header_len: mask_at + 4,
        payload_len,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// What `read` does with each whole message; it may answer in `reply`
/// (the echo mode does), after the pongs of the frames before it.
pub(crate) type OnMessage<'f> = dyn FnMut(Message<'_>, &mut BytesMut) -> Result<(), WsError> + 'f;

/// Reads every whole frame at the start of `input` (unmasking in place).
/// Each whole message goes to `on_message`; a fragmented one is assembled
/// in `assembly`, which `lend` provides. Pongs and the close echo are
/// appended to `reply`, in the order of the frames they answer.
pub(crate) fn read(
    state: &mut WsState,
    input: &mut [u8],
    assembly: &mut Option<Box<BytesMut>>,
    lend: &mut dyn FnMut() -> Box<BytesMut>,
    reply: &mut BytesMut,
    on_message: &mut OnMessage<'_>,
) -> Result<WsRead, WsError> {
    let mut read = WsRead::default();
    while let Some(header) = parse_header(&input[read.consumed..])? {
        let control = header.opcode & 0x8 != 0;
        if control && (!header.fin || header.payload_len > CONTROL_PAYLOAD_MAX) {
            return Err(fail(
                CloseCode::PROTOCOL_ERROR,
                "control frames are short and whole",
            ));
        }
        let assembled = assembly.as_ref().map_or(0, |buffer| buffer.len());
        if !control && assembled.saturating_add(header.payload_len) > MESSAGE_LEN_MAX {
            return Err(fail(
                CloseCode::MESSAGE_TOO_BIG,
                "message over the frame limit",
            ));
        }
        let start = read.consumed + header.header_len;
        let Some(end) = start
            .checked_add(header.payload_len)
            .filter(|&end| end <= input.len())
        else {
            break;
        };
        read.consumed = end;
        let payload = &mut input[start..end];
        unmask(payload, header.mask);
        match header.opcode {
            OP_TEXT | OP_BINARY => {
                if state.fragmented.is_some() {
                    return Err(fail(
                        CloseCode::PROTOCOL_ERROR,
                        "a new message inside a fragmented one",
                    ));
                }
                let text = header.opcode == OP_TEXT;
                if header.fin {
                    finish_message(text, payload, reply, on_message)?;
                } else {
                    state.fragmented = Some(text);
                    let mut buffer = lend();
                    buffer.extend_from_slice(payload);
                    check_text_so_far(text, &buffer, 0)?;
                    *assembly = Some(buffer);
                }
            }
            OP_CONTINUATION => {
                let Some(text) = state.fragmented else {
                    return Err(fail(CloseCode::PROTOCOL_ERROR, "a continuation of nothing"));
                };
                let buffer = assembly.get_or_insert_with(&mut *lend);
                let added_at = buffer.len();
                buffer.extend_from_slice(payload);
                check_text_so_far(text, buffer, added_at)?;
                if header.fin {
                    state.fragmented = None;
                    let buffer = assembly.take().expect("assembling");
                    finish_message(text, &buffer, reply, on_message)?;
                }
            }
            OP_PING => write_frame(OP_PONG, payload, reply),
            OP_PONG => {}
            OP_CLOSE => {
                let code = close_payload_code(payload)?;
                if !state.close_sent {
                    state.close_sent = true;
                    // Echo the code, as RFC 6455 §5.5.1 asks.
                    write_close(code.unwrap_or(CloseCode::NORMAL), "", reply);
                }
                read.closed = true;
                return Ok(read);
            }
            _ => return Err(fail(CloseCode::PROTOCOL_ERROR, "reserved opcode")),
        }
    }
    Ok(read)
}

fn finish_message(
    text: bool,
    payload: &[u8],
    reply: &mut BytesMut,
    on_message: &mut OnMessage<'_>,
) -> Result<(), WsError> {
    if text && std::str::from_utf8(payload).is_err() {
        return Err(fail(CloseCode::INVALID_PAYLOAD, "text that is not UTF-8"));
    }
    on_message(Message { text, payload }, reply)
}

/// Fails a fragmented text message as soon as it cannot become UTF-8.
/// The bytes before `added_at` were checked already (valid, but for a
/// character not finished yet): only that character and what follows are
/// checked again, so a message in many small fragments is checked in time
/// linear in its length.
fn check_text_so_far(text: bool, assembled: &[u8], added_at: usize) -> Result<(), WsError> {
    if !text {
        return Ok(());
    }
    // An unfinished character is at most 3 bytes, and starts with a byte
    // that is not a continuation byte (0b10xx_xxxx).
    let from = (added_at.saturating_sub(3)..added_at)
        .rev()
        .find(|&at| assembled[at] & 0xC0 != 0x80)
        .unwrap_or(added_at);
    match std::str::from_utf8(&assembled[from..]) {
        Err(error) if error.error_len().is_some() => {
            Err(fail(CloseCode::INVALID_PAYLOAD, "text that is not UTF-8"))
        }
        _ => Ok(()),
    }
}

/// A close frame's code: none, or a code a peer may send, with a UTF-8
/// reason.
fn close_payload_code(payload: &[u8]) -> Result<Option<CloseCode>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(fail(CloseCode::PROTOCOL_ERROR, "a close frame of one byte")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !CloseCode::may_be_sent(code) {
                return Err(fail(
                    CloseCode::PROTOCOL_ERROR,
                    "a close code peers may not send",
                ));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(fail(
                    CloseCode::INVALID_PAYLOAD,
                    "a close reason that is not UTF-8",
                ));
            }
            Ok(Some(CloseCode(code)))
        }
    }
}

/// Bytes of the header `write_header` writes for a payload of `len`.
pub(crate) fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// A server frame's header (unmasked, FIN set).
pub(crate) fn write_header(opcode: u8, len: usize, out: &mut BytesMut) {
    out.put_u8(FIN | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// The header of a binary message of `len` bytes (a Herald frame follows).
pub(crate) fn write_binary_header(len: usize, out: &mut BytesMut) {
    write_header(OP_BINARY, len, out);
}

fn write_frame(opcode: u8, payload: &[u8], out: &mut BytesMut) {
    write_header(opcode, payload.len(), out);
    out.put_slice(payload);
}

/// A whole message back as it came (the test-only echo mode).
pub(crate) fn write_message(message: &Message<'_>, out: &mut BytesMut) {
    let opcode = if message.text { OP_TEXT } else { OP_BINARY };
    write_frame(opcode, message.payload, out);
}

/// A close frame with `code` and a short `reason`.
pub(crate) fn write_close(code: CloseCode, reason: &str, out: &mut BytesMut) {
    let reason = &reason.as_bytes()[..reason.len().min(CONTROL_PAYLOAD_MAX - 2)];
    write_header(OP_CLOSE, 2 + reason.len(), out);
    out.put_u16(code.0);
    out.put_slice(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status_of(upgrade: &Upgrade) -> u16 {
        match upgrade {
            Upgrade::Accept { .. } => 101,
            Upgrade::Refuse { status, .. } => *status,
            Upgrade::Incomplete => 0,
        }
    }

    #[test]
    fn an_upgrade_gets_the_rfc_accept_key_and_the_rest_is_the_stream() {
        let mut input = request("Sec-WebSocket-Protocol: chat, herald.v1\r\n").into_bytes();
        let head = input.len();
        input.extend_from_slice(b"\x82\x80");
        let Upgrade::Accept { response, head_len } = upgrade(&input, &[]) else {
            panic!("refused");
        };
        let response = String::from_utf8(response).unwrap();
        // RFC 6455 §1.3's example.
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.contains("Sec-WebSocket-Protocol: herald.v1\r\n"));
        assert!(response.starts_with("HTTP/1.1 101 "));
        assert_eq!(head_len, head);
    }

    #[test]
    fn upgrade_refusals_have_their_documented_status() {
        let bad_key = request("").replace(KEY, "c2hvcnQ=");
        let cases = [
            (request("").replace("/v1/connect", "/other"), 404),
            (request("").replace("GET", "POST"), 405),
            (request("").replace("Upgrade: websocket\r\n", ""), 400),
            (
                request("").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            (
                request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                400,
            ),
            (bad_key, 400),
            ("\x16\x03\x01\x02\x00 not http\r\n\r\n".to_owned(), 400),
        ];
        for (input, status) in cases {
            assert_eq!(
                status_of(&upgrade(input.as_bytes(), &[])),
                status,
                "{input:?}"
            );
        }
        let allowed = vec!["https://app.example.com".to_owned()];
        let from = |origin: &str| request(&format!("Origin: {origin}\r\n"));
        assert_eq!(
            status_of(&upgrade(from("https://evil.example").as_bytes(), &allowed)),
            403
        );
        assert_eq!(
            status_of(&upgrade(request("").as_bytes(), &allowed)),
            101,
            "not from a browser"
        );
        assert_eq!(
            status_of(&upgrade(
                from("https://app.example.com").as_bytes(),
                &allowed
            )),
            101
        );
    }

    #[test]
    fn a_partial_head_waits_and_an_endless_one_is_refused() {
        let whole = request("");
        assert_eq!(
            upgrade(&whole.as_bytes()[..whole.len() - 3], &[]),
            Upgrade::Incomplete
        );
        let endless = format!(
            "GET /v1/connect HTTP/1.1\r\nX: {}",
            "a".repeat(HEAD_LEN_MAX)
        );
        assert_eq!(status_of(&upgrade(endless.as_bytes(), &[])), 400);
    }

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = BytesMut::new();
        out.put_u8(first);
        match payload.len() {
            0..=125 => out.put_u8(0x80 | payload.len() as u8),
            126..=0xFFFF => {
                out.put_u8(0x80 | 126);
                out.put_u16(payload.len() as u16);
            }
            _ => {
                out.put_u8(0x80 | 127);
                out.put_u64(payload.len() as u64);
            }
        }
        out.put_slice(&mask);
        let mut masked = payload.to_vec();
        unmask(&mut masked, mask);
        out.put_slice(&masked);
        out.to_vec()
    }

    struct Reader {
        state: WsState,
        assembly: Option<Box<BytesMut>>,
        reply: BytesMut,
        messages: Vec<(bool, Vec<u8>)>,
    }

    impl Reader {
        fn new() -> Reader {
            Reader {
                state: WsState::default(),
                assembly: None,
                reply: BytesMut::new(),
                messages: Vec::new(),
            }
        }

        fn read(&mut self, input: &[u8]) -> Result<WsRead, WsError> {
            let mut input = input.to_vec();
            let messages = &mut self.messages;
            read(
                &mut self.state,
                &mut input,
                &mut self.assembly,
                &mut || Box::new(BytesMut::new()),
                &mut self.reply,
                &mut |message, _reply| {
                    messages.push((message.text, message.payload.to_vec()));
                    Ok(())
                },
            )
        }
    }

    #[test]
    fn whole_and_fragmented_messages_are_unmasked_and_assembled() {
        let mut reader = Reader::new();
        let mut input = frame(0x82, b"whole");
        input.extend(frame(0x02, b"fir"));
        input.extend(frame(0x89, b"ping in between"));
        input.extend(frame(0x80, b"st"));
        let read = reader.read(&input).unwrap();
        assert_eq!(read.consumed, input.len());
        assert_eq!(
            reader.messages,
            [(false, b"whole".to_vec()), (false, b"first".to_vec())]
        );
        assert_eq!(
            &reader.reply[..],
            &frame_unmasked(0x8A, b"ping in between")[..]
        );
        assert!(reader.assembly.is_none());
    }

    fn frame_unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_header(first & 0x0F, payload.len(), &mut out);
        out.put_slice(payload);
        out.to_vec()
    }

    #[test]
    fn a_frame_split_anywhere_waits_for_the_rest() {
        let whole = frame(0x82, &[7; 300]);
        for cut in 0..whole.len() {
            let mut reader = Reader::new();
            let read = reader.read(&whole[..cut]).unwrap();
            assert_eq!(read.consumed, 0, "cut at {cut}");
            assert!(reader.messages.is_empty());
        }
    }

    #[test]
    fn protocol_violations_get_their_close_codes() {
        let unmasked = {
            let mut bytes = frame(0x82, b"x");
            bytes[1] &= 0x7F;
            bytes
        };
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked, 1002),
            (frame(0xC2, b"rsv1"), 1002),
            (frame(0x83, b"reserved opcode"), 1002),
            (frame(0x09, b"fragmented ping"), 1002),
            (frame(0x89, &[0; 126]), 1002),
            (frame(0x80, b"continuation of nothing"), 1002),
            (frame(0x82, &vec![0; MESSAGE_LEN_MAX + 1]), 1009),
            (frame(0x81, &[0xff, 0xfe]), 1007),
            (frame(0x88, &[0x03]), 1002),
            (frame(0x88, &[0x03, 0xEC]), 1002), // 1004 may not be sent
            (frame(0x88, &[0x03, 0xE8, 0xff]), 1007),
        ];
        for (input, code) in cases {
            let error = Reader::new().read(&input).unwrap_err();
            assert_eq!(error.code, CloseCode(code), "{:?}", error.reason);
        }
        // Fragments past the limit, and a new message inside a fragmented one.
        let mut reader = Reader::new();
        reader
            .read(&frame(0x02, &vec![0; MESSAGE_LEN_MAX]))
            .unwrap();
        assert_eq!(
            reader.read(&frame(0x80, b"x")).unwrap_err().code,
            CloseCode(1009)
        );
        let mut reader = Reader::new();
        reader.read(&frame(0x02, b"a")).unwrap();
        assert_eq!(
            reader.read(&frame(0x82, b"b")).unwrap_err().code,
            CloseCode(1002)
        );
        // Invalid UTF-8 fails before the message ends.
        let mut reader = Reader::new();
        assert_eq!(
            reader.read(&frame(0x01, &[0xce, 0xff])).unwrap_err().code,
            CloseCode(1007)
        );
    }

    #[test]
    fn a_close_is_echoed_once_with_its_code() {
        let mut reader = Reader::new();
        let read = reader
            .read(&frame(0x88, &[0x03, 0xE9, b'b', b'y', b'e']))
            .unwrap();
        assert!(read.closed);
        assert_eq!(&reader.reply[..], &[0x88, 2, 0x03, 0xE9]);
        let mut reader = Reader::new();
        reader.state.close_sent = true;
        assert!(reader.read(&frame(0x88, &[])).unwrap().closed);
        assert!(reader.reply.is_empty(), "ours went first");
    }

    /// Reads `input` in one go, echoing each message as the test-only echo
    /// mode does; returns the reply and how reading ended.
    fn echo_read(input: &[u8]) -> (BytesMut, Result<WsRead, WsError>) {
        let mut input = input.to_vec();
        let mut reply = BytesMut::new();
        let result = read(
            &mut WsState::default(),
            &mut input,
            &mut None,
            &mut || Box::new(BytesMut::new()),
            &mut reply,
            &mut |message, reply| {
                write_message(&message, reply);
                Ok(())
            },
        );
        (reply, result)
    }

    #[test]
    fn answers_follow_the_order_of_the_frames_they_answer() {
        let mut input = frame(0x81, b"one");
        input.extend(frame(0x89, b"p"));
        input.extend(frame(0x02, b"tw"));
        input.extend(frame(0x80, b"o"));
        input.extend(frame(0x88, &[0x03, 0xE8]));
        input.extend(frame(0x82, b"after the close"));
        let (reply, result) = echo_read(&input);
        assert!(result.unwrap().closed);
        let mut expected = frame_unmasked(0x81, b"one");
        expected.extend(frame_unmasked(0x8A, b"p"));
        expected.extend(frame_unmasked(0x82, b"two"));
        expected.extend([0x88, 2, 0x03, 0xE8]);
        assert_eq!(&reply[..], &expected[..]);
    }

    #[test]
    fn messages_before_a_violation_are_answered_before_it_fails() {
        // Autobahn 3.2 and 5.15: a message, then a frame that fails the
        // connection, in one read.
        let mut input = frame(0x81, b"Hello, world!");
        input.extend(frame(0xA1, b"rsv2"));
        let (reply, result) = echo_read(&input);
        assert_eq!(result.unwrap_err().code, CloseCode::PROTOCOL_ERROR);
        assert_eq!(&reply[..], &frame_unmasked(0x81, b"Hello, world!")[..]);
        let mut input = frame(0x01, b"fragment1");
        input.extend(frame(0x80, b"fragment2"));
        input.extend(frame(0x00, b"fragment3"));
        let (reply, result) = echo_read(&input);
        assert_eq!(result.unwrap_err().code, CloseCode::PROTOCOL_ERROR);
        assert_eq!(&reply[..], &frame_unmasked(0x81, b"fragment1fragment2")[..]);
    }

    #[test]
    fn fragmented_text_is_checked_as_a_whole_prefix_would_be() {
        let texts: [&[u8]; 8] = [
            "κόσμε \u{1D11E} € ascii".as_bytes(),
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited",
            b"ab\xed\xa0\x80cd",
            b"\xf0\x9d\x84",
            b"\xf0\x9d\x84\x9e\xf0\x9d\x84\x9e",
            b"a\xc0\xafb",
            b"\xe2\x82",
            b"ok\xff",
        ];
        for text in texts {
            for size in 1..=4 {
                let mut assembled = Vec::new();
                for chunk in text.chunks(size) {
                    let added_at = assembled.len();
                    assembled.extend_from_slice(chunk);
                    let whole_prefix = match std::str::from_utf8(&assembled) {
                        Err(error) => error.error_len().is_none(),
                        Ok(_) => true,
                    };
                    let checked = check_text_so_far(true, &assembled, added_at);
                    assert_eq!(checked.is_ok(), whole_prefix, "{text:?} in {size}s");
                    if checked.is_err() {
                        break;
                    }
                }
            }
        }
        assert!(check_text_so_far(false, b"\xff", 0).is_ok(), "binary");
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        for (len, expected) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let mut out = BytesMut::new();
            write_binary_header(len, &mut out);
            assert_eq!(out.len(), expected, "{len}");
            assert_eq!(header_len(len), expected);
            assert_eq!(out[0], 0x82);
        }
    }
}
