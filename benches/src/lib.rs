//! The end-to-end benchmark harness behind `reshard-bench` (see `benches/README.md`).
//!
//! In: a topology (local throwaway clusters, or servers given by URL) and [`scenarios::Settings`].
//! Out: a [`report::Report`] comparing reshard, driven as a subprocess, with what an operator
//! would otherwise use: native logical replication fanned out over N row-filtered slots, N raw
//! filtered `COPY` pipes, and one slot read by reshard's own replication client (the ceiling).
//!
//! ```text
//!  servers ── setup (schema, fill, expected shares) ──► scenarios ──► report (md + json)
//!                                                        │  catchup: ceiling | native | reshard
//!                                                        │  fullload: raw-copy | native | reshard
//!                                                        │            | reshard-watermark
//!                                                        │  steady:  native | reshard (latency)
//!                                                        └─ procstat: CPU, RSS, spill size
//! ```
//!
//! Invariant: every contestant's shards are checked against PostgreSQL's own hash
//! partitioning of the source after its run, and the result (`rows_match_source`, a note on
//! mismatch) stands next to its speed; a figure that could not be measured is recorded as
//! missing, with the reason.
//!
//! Micro-benchmarks of single stages (decoder, routing hash, spill, apply batches) are the
//! criterion benches in `benches/benches/`.

pub mod ceiling;
pub mod daemon;
pub mod native;
pub mod procstat;
pub mod raw_copy;
pub mod report;
pub mod scenarios;
pub mod servers;
pub mod setup;
