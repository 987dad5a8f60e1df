//! Replication client: connects to the source with `replication=database`, runs replication commands and streams XLogData. (Being built.)
