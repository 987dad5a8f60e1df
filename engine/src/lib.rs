//! reshard's engine: everything that moves data from one PostgreSQL source into N hash-sharded
//! PostgreSQL targets.
//!
//! ```text
//!  source PG ── 1 logical slot (pgoutput, proto v1..v4) ──►  source      (replication client)
//!                                                              │ XLogData bytes
//!                                                              ▼
//!                                                           decode      (pgoutput messages)
//!                                                              │ Change events (typed Lsn)
//!                                                              ▼
//!                                                           decode::assemble (streamed txns too)
//!                                                              │ committed transactions (TxnEvent)
//!                                                              ▼
//!                                                           route       (account_id → shard)
//!                                                              │ per-shard sub-transactions
//!                                                              ▼
//!                                                 spill (local, durable, zstd segments)
//!                           ack flush LSN to source ◄──────────┤ (once durable here)
//!                                     ┌────────────────────────┼──────────────────────┐
//!                                     ▼                        ▼                      ▼
//!                               apply shard 0            apply shard 1    …     apply shard N-1
//!                              (batch, 1 txn,           (independent pace,      (progress row in
//!                               progress row)            own cursor)             same txn)
//! ```
//!
//! The full load (`snapshot`) runs before CDC on the same slot, under the slot's exported
//! snapshot, or (`[snapshot] mode = "watermark"`) in key-ordered chunks each under its own
//! short snapshot while CDC fills the spill log. [`runtime`] wires the stages; [`ops`] holds
//! the operator's commands.
//!
//! ## The tree: three tiers around the stages
//!
//! ```text
//! ground      lsn event error config status shutdown localfs metrics   types, config, defined once
//!             trace (the per-stage latency trace, a debug facility)
//! pg/         conn (connections, error text), sql (quoting, TableName), copy_text (COPY text's
//!             escapes), catalog (THE table-set resolver and the publication), table (one table
//!             described), progress (reshard.progress rows, one reader and one writer), identity
//!             (the shard key against the replica identity), fence (reshard.fence, the write
//!             fences' record: one reader), reverse (reshard.reverse, the reverse direction's
//!             record; its slot and publication)
//! stages      source/ (+ slot: publication and slot, created once) decode/ route/ spill/ apply/
//!             snapshot/ (+ handoff: full load -> CDC)
//!             quarantine/ admin/
//! runtime/    mod (start: the wiring only), options (config -> each stage's options, the
//!             account map), startup (the start-up proof), begin (proof inputs, slot, full load,
//!             first stream, in that order), ingest (slot -> decode -> route -> spill, one OS
//!             thread), supervisor (watches, control, heartbeats, stop), status (the snapshot),
//!             reverse (a cut-over shard's writes streaming back to the source), side (one
//!             shard's slot streamed into one other database: reverse and moves use it)
//! ops/        the operator's commands: check verify/ cutover fence observe (status, lag) purge
//!             plan grow (N -> M for hash layouts) balance (N -> M for account maps) reverse
//!             (set up at a fenced cutover; rollback) moves (accounts or a hash range between
//!             live shards) rebalance (growing N -> M for hash layouts as hash-range moves)
//! ```
//!
//! Rules the code keeps: [`pg`] imports the ground only; a stage imports the ground and
//! [`pg`], never another stage nor [`runtime`] or [`ops`]; [`runtime`] wires stages and imports
//! no [`ops`] module; the CLI talks to [`runtime`], [`ops`], [`pg`] and the ground. Each config
//! section converts once into its stage's options (`SpillOptions::from`,
//! `FullLoadOptions::from_config`, `ApplyOptions::from_config`), whose `Default` is the
//! section's default, so a default lives in one place; [`config::Config`] validates `[spill]` and
//! `[snapshot]` with those stages' own checks so a range is defined once. Known exceptions, kept
//! and named: `pg::conn` and `route::refresh` use `source::ConnConfig` (the one parsed
//! connection description; it is built on the replication client's own wire and error type);
//! `metrics` serves through `admin`; `quarantine` stores events with the spill codec and
//! replays through `apply` and `route`.

pub mod config;
pub mod error;
pub mod event;
pub mod localfs;
pub mod lsn;
pub mod metrics;
pub mod shutdown;
pub mod status;
pub mod trace;

pub mod pg;

pub mod admin;
pub mod apply;
pub mod decode;
pub mod quarantine;
pub mod route;
pub mod snapshot;
pub mod source;
pub mod spill;

pub mod runtime;

pub mod ops;

pub use event::{
    Begin, Change, Column, Commit, OldRow, Relation, ReplicaIdentity, Row, ShardEvent, ShardId,
    TableId, TxnEvent, Value,
};
pub use lsn::Lsn;
