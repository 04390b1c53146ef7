//! Property tests of the codec: round trips for every op, any split of the
//! byte stream, garbage that never panics, and the length prefix checked
//! before anything else.
//!
//! Case counts are kept modest so the suite runs in a few seconds in debug
//! builds; the cargo-fuzz target in `fuzz/` is the long-running search.

use bytes::{Bytes, BytesMut};
use herald_proto::limits::{
    APP_ID_LEN_MAX, CLIENT_VERSION_LEN_MAX, DEVICE_ID_LEN_MAX, FRAME_BODY_LEN_MAX, HINT_LEN_MAX,
    PAYLOAD_LEN_MAX, ROUTE_LEN_MAX, TAG_LEN_MAX, TAGS_PER_BIND_MAX, TEXT_LEN_MAX, TOKEN_LEN_MAX,
    USER_ID_LEN_MAX,
};
use herald_proto::{
    BindErrorCode, DecodeError, ErrorCode, Features, Frame, GoAwayReason, MessageId, NetworkType,
    Op, PullStatus, ResetSequence, UnbindReason, UpstreamStatus, decode, decode_slice, encode,
    encoded_len,
};
use proptest::prelude::*;

/// Field sizes a strategy may produce. The every-split test walks every byte
/// of its stream, so it keeps frames small; the others also reach the limits.
#[derive(Clone, Copy)]
enum Sizes {
    Small,
    UpToLimits,
}

/// A string of at most `max` bytes (at least one if `non_empty`), with
/// multi-byte characters so byte and char counts differ.
fn text(max: usize, non_empty: bool, sizes: Sizes) -> BoxedStrategy<String> {
    let min = usize::from(non_empty);
    let short = proptest::collection::vec(any::<char>(), min..=max.min(24))
        .prop_map(move |chars| {
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
        .boxed();
    match sizes {
        Sizes::Small => short,
        // Exactly at the limit, with a two-byte character at the end when
        // it fits, so an off-by-one in either the byte or the char count
        // shows.
        Sizes::UpToLimits => prop_oneof![
            3 => short,
            1 => Just(if max >= 2 {
                format!("{}é", "x".repeat(max - 2))
            } else {
                "x".repeat(max)
            }),
        ]
        .boxed(),
    }
}

fn payload(sizes: Sizes) -> BoxedStrategy<Bytes> {
    let small = proptest::collection::vec(any::<u8>(), 0..256)
        .prop_map(Bytes::from)
        .boxed();
    match sizes {
        Sizes::Small => small,
        // Large payloads are a pattern rather than random bytes: generating
        // 64 KiB of independent values per case is slow in debug builds and
        // finds nothing a pattern does not.
        Sizes::UpToLimits => prop_oneof![
            3 => small,
            1 => (0..=PAYLOAD_LEN_MAX, any::<u8>()).prop_map(|(len, seed)| {
                Bytes::from((0..len).map(|i| seed.wrapping_add(i as u8)).collect::<Vec<u8>>())
            }),
            1 => Just(Bytes::from(vec![0xa5; PAYLOAD_LEN_MAX])),
        ]
        .boxed(),
    }
}

fn network() -> impl Strategy<Value = NetworkType> {
    proptest::sample::select(NetworkType::ALL.to_vec())
}

/// Every variant of `Frame`, every field within its limits.
fn frame(sizes: Sizes) -> impl Strategy<Value = Frame> {
    let app = move || text(APP_ID_LEN_MAX, true, sizes);
    prop_oneof![
        (
            text(DEVICE_ID_LEN_MAX, true, sizes),
            text(CLIENT_VERSION_LEN_MAX, false, sizes),
            network(),
            any::<u32>()
        )
            .prop_map(
                |(device_id, client_version, network, features)| Frame::Hello {
                    device_id,
                    client_version,
                    network,
                    features: Features(features),
                }
            ),
        (any::<u32>(), any::<Option<u64>>()).prop_map(|(heartbeat_interval_ms, storage_epoch)| {
            Frame::HelloOk {
                heartbeat_interval_ms,
                storage_epoch,
            }
        }),
        (
            app(),
            text(TOKEN_LEN_MAX, false, sizes),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            prop::collection::vec(text(TAG_LEN_MAX, true, sizes), 0..=TAGS_PER_BIND_MAX)
        )
            .prop_map(
                |(app, token, last_seq, last_broadcast_seq, tags)| Frame::Bind {
                    app,
                    token,
                    last_seq,
                    last_broadcast_seq,
                    tags,
                }
            ),
        (app(), any::<[u8; 16]>(), any::<u64>(), payload(sizes)).prop_map(
            |(app, id, seq, payload)| Frame::Broadcast {
                app,
                message_id: MessageId(id),
                seq,
                payload,
            }
        ),
        (app(), any::<u64>()).prop_map(|(app, seq)| Frame::BroadcastAck { app, seq }),
        (app(), any::<bool>(), any::<u64>()).prop_map(|(app, broadcasts, after)| Frame::Reset {
            app,
            sequence: if broadcasts {
                ResetSequence::Broadcasts
            } else {
                ResetSequence::Inbox
            },
            after,
        }),
        (app(), text(USER_ID_LEN_MAX, true, sizes))
            .prop_map(|(app, user)| Frame::BindOk { app, user }),
        (app(), any::<u16>(), text(TEXT_LEN_MAX, false, sizes)).prop_map(|(app, code, message)| {
            Frame::BindErr {
                app,
                code: BindErrorCode(code),
                message,
            }
        }),
        Just(Frame::Ping),
        Just(Frame::Pong),
        any::<u32>().prop_map(|interval_ms| Frame::Heartbeat { interval_ms }),
        (app(), any::<[u8; 16]>(), any::<u64>(), payload(sizes)).prop_map(
            |(app, id, seq, payload)| Frame::Push {
                app,
                message_id: MessageId(id),
                seq,
                payload,
            }
        ),
        (app(), any::<u64>()).prop_map(|(app, seq)| Frame::Ack { app, seq }),
        (app(), payload(sizes)).prop_map(|(app, payload)| Frame::Transient { app, payload }),
        (
            app(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            text(HINT_LEN_MAX, false, sizes)
        )
            .prop_map(|(app, id, seq, size, pull_spread_ms, hint)| Frame::Notify {
                app,
                message_id: MessageId(id),
                seq,
                size,
                pull_spread_ms,
                hint,
            }),
        (app(), any::<u64>()).prop_map(|(app, seq)| Frame::Pull { app, seq }),
        (app(), network(), any::<u32>(), any::<u32>()).prop_map(
            |(app, network, interval_ms, closed_ago_ms)| Frame::SessionTimedOut {
                app,
                network,
                interval_ms,
                closed_ago_ms,
            }
        ),
        (
            app(),
            any::<u64>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            payload(sizes)
        )
            .prop_map(|(app, seq, status, id, payload)| Frame::PullReply {
                app,
                seq,
                status: PullStatus(status),
                message_id: MessageId(id),
                payload,
            }),
        (
            app(),
            any::<u64>(),
            proptest::option::of(text(ROUTE_LEN_MAX, true, sizes)),
            payload(sizes)
        )
            .prop_map(|(app, request_id, route, payload)| Frame::Upstream {
                app,
                request_id,
                route,
                payload,
            }),
        (app(), any::<u64>(), any::<u16>()).prop_map(|(app, request_id, status)| {
            Frame::UpstreamAck {
                app,
                request_id,
                status: UpstreamStatus(status),
            }
        }),
        (app(), proptest::option::of(any::<u16>())).prop_map(|(app, reason)| Frame::Unbind {
            app,
            reason: reason.map(UnbindReason)
        }),
        (any::<u16>(), any::<Option<u32>>()).prop_map(|(reason, reconnect_delay_ms)| {
            Frame::GoAway {
                reason: GoAwayReason(reason),
                reconnect_delay_ms,
            }
        }),
        (any::<u16>(), text(TEXT_LEN_MAX, false, sizes)).prop_map(|(code, message)| {
            Frame::Error {
                code: ErrorCode(code),
                message,
            }
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

/// Feeds `bytes` cut at the (sorted) offsets in `cuts` and decodes whatever
/// is complete after each piece arrives.
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

/// Runs the decoder over untrusted bytes until it errors or wants more. Each
/// frame it accepts must re-encode to bytes that decode to the same frame
/// (not necessarily the same bytes: an unknown network byte reads as
/// `Unknown` and is written as 0).
fn decode_untrusted(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buffer = BytesMut::from(bytes);
    // Every accepted frame consumes at least one byte, so this ends.
    while let Ok(Some(frame)) = decode(&mut buffer) {
        let mut again = BytesMut::new();
        prop_assert!(encode(&frame, &mut again).is_ok(), "{frame:?} re-encodes");
        prop_assert_eq!(again.len(), encoded_len(&frame));
        prop_assert_eq!(decode_slice(&again), Ok(Some((frame, again.len()))));
    }
    let _ = decode_slice(bytes);
    Ok(())
}

/// A frame body shaped enough like v1 to get past the prefix, version and op
/// checks, so the field parsers see the garbage.
fn plausible_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![9 => Just(1u8), 1 => any::<u8>()],
        // Every op up to the newest, and an unknown one past it.
        0u8..=Op::SessionTimedOut as u8 + 1,
        proptest::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => Just(0u8), 1 => Just(1u8)],
            0..96,
        ),
    )
        .prop_map(|(version, op, fields)| {
            let len = (2 + fields.len()) as u32;
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[version, op]);
            bytes.extend_from_slice(&fields);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_frame_round_trips(frame in frame(Sizes::UpToLimits)) {
        let bytes = encode_all(std::slice::from_ref(&frame));
        prop_assert_eq!(bytes.len(), encoded_len(&frame));
        prop_assert!(bytes.len() <= 4 + FRAME_BODY_LEN_MAX);
        prop_assert_eq!(decode_slice(&bytes), Ok(Some((frame.clone(), bytes.len()))));
        let mut buffer = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buffer), Ok(Some(frame)));
        prop_assert!(buffer.is_empty());
    }

    #[test]
    fn a_stream_decodes_the_same_in_random_chunks(
        frames in proptest::collection::vec(frame(Sizes::UpToLimits), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_chunked(&bytes, &cuts), frames);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_untrusted(&bytes)?;
    }

    #[test]
    fn plausible_garbage_never_panics(
        frames in proptest::collection::vec(plausible_frame(), 1..4),
    ) {
        decode_untrusted(&frames.concat())?;
    }

    #[test]
    fn corrupted_streams_never_panic(
        frames in proptest::collection::vec(frame(Sizes::Small), 1..4),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        keep in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_all(&frames);
        for (at, value) in edits {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        bytes.truncate(keep.index(bytes.len() + 1));
        decode_untrusted(&bytes)?;
    }

    #[test]
    fn an_oversized_prefix_is_refused_with_four_bytes(
        len in (FRAME_BODY_LEN_MAX as u32 + 1)..=u32::MAX,
    ) {
        let error = DecodeError::FrameTooLarge { len };
        prop_assert_eq!(decode_slice(&len.to_be_bytes()), Err(error));
        let mut buffer = BytesMut::from(&len.to_be_bytes()[..]);
        prop_assert_eq!(decode(&mut buffer), Err(error));
        // Nothing was reserved for the body the peer announced.
        prop_assert!(buffer.capacity() < 1024);
    }

    // Each case decodes its stream once per byte, so its frames are small.
    #[test]
    fn a_stream_decodes_the_same_split_at_every_byte(
        frames in proptest::collection::vec(frame(Sizes::Small), 1..4),
    ) {
        let bytes = encode_all(&frames);
        for cut in 0..=bytes.len() {
            prop_assert_eq!(&decode_chunked(&bytes, &[cut]), &frames, "cut at {}", cut);
        }
    }
}
