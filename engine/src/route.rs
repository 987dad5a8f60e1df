//! Routing: account_id → shard. (Being built.)
