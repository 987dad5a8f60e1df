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
//! snapshot. [`runtime`] wires the stages.
//!
//! ## The tree as it is (flat modules, grouped here by role)
//!
//! ```text
//! ground      lsn event error config status localfs       types and config, defined once
//! pg toolkit  pgconn     connections, quoting, error text
//!             catalog    THE table-set resolver (run, check, verify, cutover, status) + publication
//!             tableinfo  describe one table (columns, keys, replica identity)
//!             progress   reshard.progress rows     identity  migration identity
//! stages      source/ decode/ route/ spill/ apply/ snapshot/ admin/
//! wiring      runtime (start), ingest (slot -> decode -> route -> spill, one thread),
//!             startup (the start-up proof), handoff (full load -> CDC), metrics
//! operator    check verify/ cutover observe (status, lag) purge
//! ```
//!
//! Rules the code keeps: a stage imports the ground and the pg toolkit, never another stage
//! nor the wiring or operator modules; the ground imports no stage, except that
//! [`config::Config`] validates `[spill]` and `[snapshot]` with those stages' own checks so a
//! range is defined once; each config section converts once into its stage's options
//! (`SpillOptions::from`, `FullLoadOptions::from_config`, `ApplyOptions::from_config`), whose
//! `Default` is the section's default. Known exceptions, kept for now: `pgconn` uses
//! `source::ConnConfig`; `metrics` serves through `admin`.

pub mod catalog;
pub mod config;
pub mod error;
pub mod event;
pub mod localfs;
pub mod lsn;
pub mod metrics;

pub mod admin;
pub mod apply;
pub mod decode;
pub mod handoff;
pub mod ingest;
pub mod quarantine;
pub mod route;
pub mod runtime;
pub mod snapshot;
pub mod source;
pub mod spill;
pub mod startup;
pub mod status;

pub mod check;
pub mod cutover;
pub mod identity;
pub mod observe;
pub mod pgconn;
pub mod progress;
pub mod purge;
pub mod tableinfo;
pub mod verify;

pub use event::{
    Begin, Change, Column, Commit, OldRow, Relation, ReplicaIdentity, Row, ShardEvent, ShardId,
    TableId, TxnEvent, Value,
};
pub use lsn::Lsn;
