//! Per-shard apply pipeline. (Being built.)
