//! integration tests
mod decode;
