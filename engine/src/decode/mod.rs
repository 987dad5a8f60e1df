//! Decode stage: pgoutput bytes in, committed transactions out.
//!
//! - [`pgoutput`]: one message's bytes → [`PgOutputMessage`] (zero-copy, never panics).
//! - [`assemble`]: messages in stream order → [`TxnEvent`](crate::event::TxnEvent)s, committed
//!   transactions only, contiguous and in commit order; streamed and prepared transactions are
//!   buffered on disk until decided.
//! - [`frame`]: the framed `(LSN, message)` file format of spool files and captured fixtures.
//! - [`json`]: deterministic JSON of assembled events (`reshard peek`, golden files).

pub mod assemble;
pub mod frame;
pub mod json;
pub mod pgoutput;

pub use assemble::{remove_leftover_spools, AssembleError, Assembler, AssemblerOptions};
pub use json::JsonRenderer;
pub use pgoutput::{decode_message, DecodeError, DecodeErrorKind, Decoder, PgOutputMessage};
