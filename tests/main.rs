//! integration tests
mod route;
