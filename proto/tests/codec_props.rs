//! Property tests of the codec: round trips for every op, any split of the
//! byte stream, and garbage that never panics.

use bytes::{Bytes, BytesMut};
use herald_proto::limits::{
    APP_ID_LEN_MAX, CLIENT_VERSION_LEN_MAX, DEVICE_ID_LEN_MAX, FRAME_BODY_LEN_MAX, TEXT_LEN_MAX,
    TOKEN_LEN_MAX, USER_ID_LEN_MAX,
};
use herald_proto::{
    BindErrorCode, DecodeError, ErrorCode, Frame, GoAwayReason, MessageId, NetworkType,
    UpstreamStatus, decode, decode_slice, encode,
};
use proptest::prelude::*;

fn text(max: usize, non_empty: bool) -> impl Strategy<Value = String> {
    // Multi-byte characters too, trimmed to the byte limit.
    let min = usize::from(non_empty);
    proptest::collection::vec(any::<char>(), min..=max.min(24)).prop_map(move |chars| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        if s.is_empty() && non_empty {
            s.push('a');
        }
        s
    })
}

fn payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from)
}

fn network() -> impl Strategy<Value = NetworkType> {
    prop_oneof![
        Just(NetworkType::Unknown),
        Just(NetworkType::Wifi),
        Just(NetworkType::Cellular),
        Just(NetworkType::Wired),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let app = || text(APP_ID_LEN_MAX, true);
    prop_oneof![
        (
            text(DEVICE_ID_LEN_MAX, true),
            text(CLIENT_VERSION_LEN_MAX, false),
            network()
        )
            .prop_map(|(device_id, client_version, network)| Frame::Hello {
                device_id,
                client_version,
                network
            }),
        any::<u32>().prop_map(|heartbeat_interval_ms| Frame::HelloOk {
            heartbeat_interval_ms
        }),
        (app(), text(TOKEN_LEN_MAX, false), any::<Option<u64>>()).prop_map(
            |(app, token, last_seq)| Frame::Bind {
                app,
                token,
                last_seq
            }
        ),
        (app(), text(USER_ID_LEN_MAX, true)).prop_map(|(app, user)| Frame::BindOk { app, user }),
        (app(), any::<u16>(), text(TEXT_LEN_MAX, false)).prop_map(|(app, code, message)| {
            Frame::BindErr {
                app,
                code: BindErrorCode(code),
                message,
            }
        }),
        Just(Frame::Ping),
        Just(Frame::Pong),
        (app(), any::<[u8; 16]>(), any::<u64>(), payload()).prop_map(|(app, id, seq, payload)| {
            Frame::Push {
                app,
                message_id: MessageId(id),
                seq,
                payload,
            }
        }),
        (app(), any::<u64>()).prop_map(|(app, seq)| Frame::Ack { app, seq }),
        (app(), any::<u64>(), payload()).prop_map(|(app, request_id, payload)| {
            Frame::Upstream {
                app,
                request_id,
                payload,
            }
        }),
        (app(), any::<u64>(), any::<u16>()).prop_map(|(app, request_id, status)| {
            Frame::UpstreamAck {
                app,
                request_id,
                status: UpstreamStatus(status),
            }
        }),
        app().prop_map(|app| Frame::Unbind { app }),
        (any::<u16>(), any::<Option<u32>>()).prop_map(|(reason, reconnect_delay_ms)| {
            Frame::GoAway {
                reason: GoAwayReason(reason),
                reconnect_delay_ms,
            }
        }),
        (any::<u16>(), text(TEXT_LEN_MAX, false)).prop_map(|(code, message)| Frame::Error {
            code: ErrorCode(code),
            message
        }),
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = BytesMut::new();
    for frame in frames {
        encode(frame, &mut bytes).unwrap();
    }
    bytes.to_vec()
}

/// Feeds `bytes` in the given chunks and decodes whatever is complete.
fn decode_chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        buffer.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Some(frame) = decode(&mut buffer).unwrap() {
            frames.push(frame);
        }
    }
    assert!(buffer.is_empty(), "bytes left over");
    frames
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let bytes = encode_all(std::slice::from_ref(&frame));
        prop_assert_eq!(decode_slice(&bytes).unwrap(), Some((frame, bytes.len())));
    }

    #[test]
    fn a_stream_decodes_the_same_split_at_every_byte(frames in proptest::collection::vec(frame(), 1..4)) {
        let bytes = encode_all(&frames);
        for cut in 0..=bytes.len() {
            prop_assert_eq!(&decode_chunked(&bytes, &[cut]), &frames);
        }
    }

    #[test]
    fn a_stream_decodes_the_same_in_random_chunks(
        frames in proptest::collection::vec(frame(), 1..6),
        mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_chunked(&bytes, &cuts), frames);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buffer = BytesMut::from(&bytes[..]);
        // Each successful decode consumes bytes, so this ends.
        while let Ok(Some(_)) = decode(&mut buffer) {}
        let _ = decode_slice(&bytes);
    }

    #[test]
    fn an_oversized_prefix_is_refused_with_four_bytes(len in (FRAME_BODY_LEN_MAX as u32 + 1)..=u32::MAX) {
        prop_assert_eq!(
            decode_slice(&len.to_be_bytes()),
            Err(DecodeError::FrameTooLarge { len })
        );
    }
}
