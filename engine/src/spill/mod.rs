//! Spill log: local durable buffer between route and apply. (Being built.)
