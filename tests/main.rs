//! Integration tests against real PostgreSQL clusters started by `reshard-harness`.
//!
//! One binary (etl's layout): each area is a module.

mod apply;
mod cdc;
mod cli;
mod common;
mod decode;
mod ops;
mod route;
mod service;
mod snapshot;
mod source;
