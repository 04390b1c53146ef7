//! herald-proto: wire protocol v1 of Herald, with no I/O.
//!
//! This crate owns the frames a client and a gateway exchange, their binary
//! encoding (an encoder into `bytes::BytesMut` and an incremental decoder that
//! accepts any split of the byte stream), the client tokens, and the
//! per-connection state machines (`ServerConn`, `ClientConn`) that run the
//! handshake, heartbeats and ack bookkeeping. It also defines the messages the
//! control plane and the gateway shards exchange (`plane`), and the token
//! bucket both use for flow control (`rate`), and the ids (`ids`): the
//! shared `AppId` and `UserId` the planes pass around, and the accepted forms
//! every part checks alike.
//!
//! It deliberately does no networking, spawns nothing and never reads the
//! clock: time is passed in, so the gateway, the client SDK and tests (with a
//! fake clock) all drive the same logic.

pub mod client;
pub mod codec;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod plane;
pub mod rate;
pub mod server;
pub mod token;
pub mod transport;

pub use codec::{DecodeError, EncodeError, decode, decode_slice, encode, encoded_len};
pub use frame::{
    BindErrorCode, ErrorCode, Features, Frame, GoAwayReason, MessageId, NetworkType, Op,
    PullStatus, ResetSequence, UnbindReason, UpstreamStatus,
};
pub use token::{TokenClaims, TokenError, sign_token, verify_token, verify_token_with_any};
pub use transport::Transport;
