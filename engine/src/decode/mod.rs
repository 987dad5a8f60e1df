//! pgoutput decoder: XLogData bytes in, typed messages out. (Being built.)
