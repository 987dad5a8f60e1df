//! Integration tests against real PostgreSQL clusters started by `reshard-harness`.
//!
//! One binary (etl's layout): each area is a module.

mod apply;
mod cdc;
mod chaos;
mod cli;
mod common;
mod console;
mod ddl;
mod decode;
mod demo;
mod key_outside_identity;
mod moves;
mod operate;
mod ops;
mod quarantine;
mod rebalance;
mod reverse;
mod robust;
mod route;
mod service;
mod snapshot;
mod source;
mod throttle;
mod versions;
mod watermark;
mod watermark_edge;
