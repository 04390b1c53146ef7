//! Feeds arbitrary bytes to the decoder in arbitrary chunks. Whatever
//! decodes must re-encode to bytes that decode to the same frame.

#![no_main]

use bytes::BytesMut;
use herald_proto::{decode, decode_slice, encode, encoded_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buffer = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match decode(&mut buffer) {
                Ok(Some(frame)) => {
                    let mut again = BytesMut::new();
                    encode(&frame, &mut again).expect("a decoded frame re-encodes");
                    assert_eq!(again.len(), encoded_len(&frame));
                    let (decoded, used) = decode_slice(&again)
                        .expect("re-encoded bytes decode")
                        .expect("re-encoded bytes are a whole frame");
                    assert_eq!(decoded, frame);
                    assert_eq!(used, again.len());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
