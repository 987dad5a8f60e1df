//! integration tests

mod snapshot;
