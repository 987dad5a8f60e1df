//! The one shutdown signal every task of the daemon watches.
//!
//! In: a [`ShutdownTx::shutdown`] call (SIGTERM, `SHUTDOWN` on the admin console, the
//! supervisor giving up). Out: every [`ShutdownRx`] sees it, now and later. A `watch` over a
//! flag that only ever turns on: a task that starts watching after the request still sees it.
//!
//! Invariant: when every [`ShutdownTx`] is gone, nobody can ask for a clean stop any more, so
//! the receivers treat that as a request too (a task never waits for a signal that cannot
//! come).

use tokio::sync::watch;

/// Asks every task to stop. Clones are handles on the same signal.
#[derive(Debug, Clone)]
pub struct ShutdownTx(watch::Sender<bool>);

/// Watches for the request to stop. Clones watch the same signal.
#[derive(Debug, Clone)]
pub struct ShutdownRx(watch::Receiver<bool>);

/// A new signal, not requested yet.
pub fn channel() -> (ShutdownTx, ShutdownRx) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTx(tx), ShutdownRx(rx))
}

impl ShutdownTx {
    /// Asks every task to stop (idempotent).
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`ShutdownTx::shutdown`] was called.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// A new receiver of this signal.
    pub fn subscribe(&self) -> ShutdownRx {
        ShutdownRx(self.0.subscribe())
    }
}

impl ShutdownRx {
    /// Whether shutdown was asked for (or every sender is gone).
    pub fn is_requested(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Resolves once shutdown is asked for (at once if it already was, or if every sender is
    /// gone). Cancel-safe: it only waits.
    pub async fn requested(&mut self) {
        loop {
            if *self.0.borrow_and_update() {
                return;
            }
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_request_reaches_receivers_made_before_and_after_it() {
        let (tx, mut early) = channel();
        assert!(!early.is_requested());
        let waiting = tokio::spawn(async move {
            early.requested().await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "no request yet");
        tx.shutdown();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting receiver wakes up")
            .unwrap();
        let mut late = tx.subscribe();
        assert!(late.is_requested());
        tokio::time::timeout(Duration::from_secs(5), late.requested())
            .await
            .expect("a receiver made after the request sees it at once");
    }

    #[tokio::test]
    async fn no_sender_left_counts_as_a_request() {
        let (tx, mut rx) = channel();
        let copy = tx.clone();
        drop(tx);
        assert!(!rx.is_requested(), "a clone still holds the signal");
        drop(copy);
        assert!(rx.is_requested());
        tokio::time::timeout(Duration::from_secs(5), rx.requested())
            .await
            .expect("no sender left: the wait ends");
    }
}
