//! integration tests
mod source;
