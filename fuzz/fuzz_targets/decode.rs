//! Fuzz target: the pgoutput decoder must return a value or a `DecodeError` for any input,
//! never panic, under every protocol version and stream state; and whatever it accepts, the
//! transaction assembler must handle without panicking.
//!
//! Input layout: byte 0 picks the protocol version (1–4) and the stream flag; the rest is one
//! pgoutput message. Seed corpus: `fuzz/seed_corpus.sh` (one file per captured fixture
//! message, prefixed with that byte).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use reshard_engine::decode::{decode_message, AssembleError, Assembler, AssemblerOptions};
use reshard_engine::Lsn;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else {
        return;
    };
    let proto = u32::from(mode & 3) + 1;
    let in_stream = mode & 4 != 0;
    let msg = Bytes::copy_from_slice(msg);
    if let Err(e) = decode_message(&msg, proto, in_stream) {
        assert!(e.offset <= msg.len());
        let _ = e.to_string();
    }
    // The assembler sees the message as the first of a stream.
    let dir = std::env::temp_dir().join("reshard-fuzz-decode");
    if let Ok(mut asm) = Assembler::new(AssemblerOptions {
        stream_dir: dir,
        proto_version: proto,
    }) {
        let _ = asm.push(Lsn::from_u64(1), msg, &mut |_, _| Ok::<(), AssembleError>(()));
    }
});
