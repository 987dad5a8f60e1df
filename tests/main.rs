//! integration tests
mod apply;
