//! The COPY BOTH stream of a started logical replication connection.
//!
//! In: CopyData frames from the walsender — `XLogData` (`'w'`) and primary keepalives (`'k'`).
//! Out: [`XLogData`] values whose `data` is pgoutput's message, a zero-copy slice of the read
//! buffer; standby status updates (`'r'`) back to the server.
//!
//! Invariants kept here:
//! - **Only what the caller marked is confirmed.** Write, flush and apply positions in every
//!   status update are the value of [`ReplicationStream::set_flushed`] (monotonic), or `0/0`
//!   before the first mark. See [`ReplicationStream::set_flushed`] for why `0/0` is the safe
//!   choice.
//! - **Never a hang.** Keepalives that ask for a reply are answered at once, a status update
//!   goes out every `status_interval`, after `idle_timeout / 2` of silence a status update
//!   asks the server for a reply (an idle source sends nothing while our status updates keep
//!   its `wal_sender_timeout` happy), and a connection that delivers nothing for
//!   `idle_timeout` while being read is reported as [`SourceError::ConnectionLost`] (time
//!   spent in [`ReplicationStream::keepalive_while_paused`] does not count: nothing is read
//!   then).
//! - **Cancellation-safe.** [`ReplicationStream::next`] keeps partial frames and unsent replies
//!   in the struct, so dropping its future (in a `select!`) loses no byte.
//!
//! See <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-XLOGDATA>.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::client::log_notice;
use super::wire::{copy_data, server_fields, Frame, Wire};
use super::SourceError;
use crate::event::{pg_now, PgTimestamp};
use crate::lsn::Lsn;

/// How often a status update is sent when nothing else prompts one (pg_recvlogical's default).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// How long the connection may deliver nothing before it is reported lost. The server sends a
/// keepalive at half its `wal_sender_timeout` (default 60 s), so silence this long means the
/// server or the network is gone.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One `XLogData` message: a piece of the decoded WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XLogData {
    /// WAL position of the start of this data.
    pub wal_start: Lsn,
    /// The server's current end of WAL.
    pub wal_end: Lsn,
    /// The server's clock at transmission.
    pub server_time: PgTimestamp,
    /// The pgoutput message (first byte is its tag: `B`, `R`, `I`, `C`, ...). A slice of the
    /// read buffer: keeping it alive keeps its 64 KiB read chunk alive, so copy out what must
    /// outlive the batch.
    pub data: Bytes,
}

/// A message inside a CopyData frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServerMessage {
    XLogData(XLogData),
    Keepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// Parses the payload of a CopyData frame from the walsender. `data` of an XLogData is a slice
/// of `payload` (no copy).
pub(crate) fn parse_server_message(payload: Bytes) -> Result<ServerMessage, SourceError> {
    let Some(&tag) = payload.first() else {
        return Err(SourceError::protocol("empty CopyData from the server"));
    };
    let mut b = &payload[1..];
    match tag {
        b'w' => {
            if b.len() < 24 {
                return Err(SourceError::protocol(format!(
                    "XLogData header truncated ({} bytes)",
                    payload.len()
                )));
            }
            let wal_start = Lsn::from_u64(b.get_u64());
            let wal_end = Lsn::from_u64(b.get_u64());
            let server_time = b.get_i64();
            Ok(ServerMessage::XLogData(XLogData {
                wal_start,
                wal_end,
                server_time,
                data: payload.slice(25..),
            }))
        }
        b'k' => {
            if b.len() < 17 {
                return Err(SourceError::protocol(format!(
                    "primary keepalive truncated ({} bytes)",
                    payload.len()
                )));
            }
            let wal_end = Lsn::from_u64(b.get_u64());
            let server_time = b.get_i64();
            let reply_requested = b.get_u8() != 0;
            Ok(ServerMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        other => Err(SourceError::protocol(format!(
            "unknown replication message {:?} ({other:#04x}) from the server",
            char::from(other)
        ))),
    }
}

/// Appends a Standby status update (`'r'`) wrapped in CopyData to `out`.
pub(crate) fn encode_status(
    out: &mut BytesMut,
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    clock: PgTimestamp,
    reply: bool,
) {
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(write.as_u64());
    body.put_u64(flush.as_u64());
    body.put_u64(apply.as_u64());
    body.put_i64(clock);
    body.put_u8(u8::from(reply));
    // A 34-byte body never overflows the length field.
    if let Ok(cd) = frontend::CopyData::new(body.freeze()) {
        cd.write(out);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Streaming,
    /// The server sent CopyDone; ours is queued; waiting for ReadyForQuery.
    Ending,
    Finished,
    Failed(String),
}

/// A started logical replication stream. Owns the connection.
pub struct ReplicationStream {
    wire: Wire,
    slot: String,
    start: Lsn,
    /// The caller's durable position; `0/0` until the first [`ReplicationStream::set_flushed`].
    flushed: Lsn,
    /// The flush position last sent to the server.
    reported: Lsn,
    /// Highest `wal_end` seen from the server.
    server_wal_end: Lsn,
    /// Highest `wal_start` of a delivered XLogData.
    last_received: Lsn,
    status_interval: Duration,
    idle_timeout: Duration,
    next_status_at: Instant,
    last_recv_at: Instant,
    /// A status update asking for a reply went out since the last byte received.
    pinged: bool,
    /// [`ReplicationStream::keepalive_while_paused`] ran since the last read: the silence
    /// before it says nothing about the server.
    paused: bool,
    state: State,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("slot", &self.slot)
            .field("start", &self.start)
            .field("flushed", &self.flushed)
            .field("server_wal_end", &self.server_wal_end)
            .finish()
    }
}

impl ReplicationStream {
    pub(crate) fn new(wire: Wire, slot: String, start: Lsn) -> ReplicationStream {
        let now = Instant::now();
        ReplicationStream {
            wire,
            slot,
            start,
            flushed: Lsn::ZERO,
            reported: Lsn::ZERO,
            server_wal_end: start,
            last_received: Lsn::ZERO,
            status_interval: DEFAULT_STATUS_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            next_status_at: now + DEFAULT_STATUS_INTERVAL,
            last_recv_at: now,
            pinged: false,
            paused: false,
            state: State::Streaming,
        }
    }

    /// Sets how often a status update is sent unprompted (default
    /// [`DEFAULT_STATUS_INTERVAL`]). Keep it well below the server's `wal_sender_timeout`.
    pub fn with_status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval.max(Duration::from_millis(10));
        self.next_status_at = Instant::now() + self.status_interval;
        self
    }

    /// Sets how long the server may send nothing before the connection counts as lost
    /// (default [`DEFAULT_IDLE_TIMEOUT`]). Make it at least the server's `wal_sender_timeout`.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// The slot being read.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The position `START_REPLICATION` asked for.
    pub fn start_lsn(&self) -> Lsn {
        self.start
    }

    /// The server's end of WAL as last reported (by XLogData or keepalive). When every
    /// transaction received so far is durable, a caller may mark this position with
    /// [`ReplicationStream::set_flushed`] so an idle slot does not retain WAL (what
    /// `pg_recvlogical` does); the stream never does that on its own.
    pub fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// The position marked durable by the caller (`0/0` before the first mark).
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Marks everything before `lsn` as durable on the caller's side, so the server may
    /// confirm it (`confirmed_flush_lsn`) and recycle the WAL. Monotonic: a lower value than
    /// the current mark is ignored. Sent with the next status update (at the latest after
    /// `status_interval`, or at once with [`ReplicationStream::send_status`]).
    ///
    /// Until the first mark, status updates report `0/0` (`InvalidXLogRecPtr`) as write, flush
    /// and apply position. The walsender ignores an invalid flush position
    /// (`ProcessStandbyReplyMessage` only calls `LogicalConfirmReceivedLocation` for a valid
    /// one) yet still counts the message as a reply for `wal_sender_timeout`, which is exactly
    /// what we need: alive, confirming nothing. Reporting the start LSN would be harmless
    /// only as long as the server treats it as already confirmed; `0/0` holds without that
    /// assumption. `pg_recvlogical` does the same before its first flush.
    /// See <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-STANDBY-STATUS-UPDATE>.
    pub fn set_flushed(&mut self, lsn: Lsn) {
        if lsn > self.flushed {
            self.flushed = lsn;
        }
    }

    /// The error a dead connection is reported with.
    fn lost(&self, reason: impl Into<String>) -> SourceError {
        SourceError::ConnectionLost {
            last_lsn: self.server_wal_end.max(self.last_received),
            reason: format!("slot {}: {}", self.slot, reason.into()),
        }
    }

    fn queue_status(&mut self, reply: bool) {
        encode_status(
            &mut self.wire.wbuf,
            self.flushed,
            self.flushed,
            self.flushed,
            pg_now(),
            reply,
        );
        self.reported = self.flushed;
        self.next_status_at = Instant::now() + self.status_interval;
    }

    /// Writes out whatever is queued, giving up (connection lost) after `idle_timeout`.
    // This is cancellation-safe: unsent bytes stay in `wire.wbuf`.
    async fn flush_pending(&mut self) -> Result<(), SourceError> {
        if self.wire.wbuf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.idle_timeout, self.wire.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost(format!("sending to the server: {e}"))),
            Err(_) => Err(self.lost(format!(
                "the server accepted no data for {:?}",
                self.idle_timeout
            ))),
        }
    }

    /// Sends a standby status update now (with the marked position), asking the server to
    /// answer with a keepalive if `reply`.
    pub async fn send_status(&mut self, reply: bool) -> Result<(), SourceError> {
        self.queue_status(reply);
        self.flush_pending().await
    }

    /// Keeps the connection alive while the caller cannot take data (its downstream is full):
    /// sends a status update every `status_interval` without reading anything, so the server's
    /// `wal_sender_timeout` does not fire (the walsender counts any reply, even while its send
    /// buffer is full). Never finishes unless sending fails, and then returns that error. Use it
    /// as the other arm of a `select!` around a blocked send.
    // This is cancellation-safe: the next deadline and unsent bytes live in `self`.
    pub async fn keepalive_while_paused(&mut self) -> SourceError {
        self.paused = true;
        loop {
            if let Err(e) = self.flush_pending().await {
                return self.fail(e);
            }
            tokio::time::sleep_until(self.next_status_at).await;
            self.queue_status(false);
        }
    }

    fn fail(&mut self, e: SourceError) -> SourceError {
        self.state = State::Failed(e.to_string());
        e
    }

    /// The next piece of WAL; `Ok(None)` when the server ended the stream cleanly.
    ///
    /// While waiting it answers keepalives and sends periodic status updates. An error from the
    /// server becomes the matching [`SourceError`] (e.g. [`SourceError::PublicationMissing`]);
    /// EOF, reset or `idle_timeout` of silence become [`SourceError::ConnectionLost`]. After an
    /// error the stream is finished: reconnect.
    // This is cancellation-safe: partial frames stay in the read buffer and queued replies in
    // the write buffer; every await below is on a cancel-safe operation (`read_buf`,
    // `write_buf`, `sleep_until` on deadlines stored in `self`).
    pub async fn next(&mut self) -> Result<Option<XLogData>, SourceError> {
        loop {
            match &self.state {
                State::Finished => return Ok(None),
                State::Failed(why) => {
                    return Err(SourceError::protocol(format!(
                        "the replication stream of slot {} already failed: {why}",
                        self.slot
                    )))
                }
                State::Streaming | State::Ending => {}
            }
            if self.paused {
                // Reading resumes after a pause: nothing was read during it, so the idle
                // deadline counts from now, not from the last byte read before it (a pause
                // longer than `idle_timeout` is not a lost connection).
                self.paused = false;
                self.last_recv_at = Instant::now();
                self.pinged = false;
            }
            if let Err(e) = self.flush_pending().await {
                return Err(self.fail(e));
            }
            // Whole frames already received.
            match self.wire.try_frame() {
                Ok(Some(frame)) => match self.handle(frame) {
                    Ok(Some(x)) => return Ok(Some(x)),
                    Ok(None) => continue,
                    Err(e) => return Err(self.fail(e)),
                },
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
            let now = Instant::now();
            if now >= self.next_status_at {
                self.queue_status(false);
                continue;
            }
            // The walsender of an idle source sends nothing as long as our status updates
            // arrive (it pings only when it has heard nothing for `wal_sender_timeout / 2`):
            // ask it for a keepalive before calling the silence a lost connection.
            let ping_at = self.last_recv_at + self.idle_timeout / 2;
            if !self.pinged && now >= ping_at {
                self.queue_status(true);
                self.pinged = true;
                continue;
            }
            let idle_deadline = self.last_recv_at + self.idle_timeout;
            if now >= idle_deadline {
                let e = self.lost(format!(
                    "no data from the server for {:?} (idle timeout)",
                    self.idle_timeout
                ));
                return Err(self.fail(e));
            }
            let status_at = self.next_status_at;
            let wake_at = if self.pinged { idle_deadline } else { ping_at };
            tokio::select! {
                biased;
                // This is cancellation-safe: `read_buf` reads nothing if dropped.
                r = self.wire.fill() => match r {
                    Ok(0) => {
                        let e = self.lost("the server closed the connection");
                        return Err(self.fail(e));
                    }
                    Ok(_) => {
                        self.last_recv_at = Instant::now();
                        self.pinged = false;
                    }
                    Err(e) => {
                        let e = self.lost(format!("reading from the server: {e}"));
                        return Err(self.fail(e));
                    }
                },
                // This is cancellation-safe: the deadline lives in `self`.
                _ = tokio::time::sleep_until(status_at) => self.queue_status(false),
                // This is cancellation-safe: the deadline is recomputed from `self`.
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// Handles one frame; `Some` for data to hand out.
    fn handle(&mut self, frame: Frame) -> Result<Option<XLogData>, SourceError> {
        let msg = match frame {
            Frame::Msg(m) => m,
            Frame::CopyBoth => {
                return Err(SourceError::protocol(
                    "a second CopyBothResponse arrived while streaming",
                ))
            }
        };
        match msg {
            Message::CopyData(body) => {
                if self.state == State::Ending {
                    // Data the server sent before it saw our CopyDone; nothing to do with it.
                    return Ok(None);
                }
                match parse_server_message(copy_data(body))? {
                    ServerMessage::XLogData(x) => {
                        self.server_wal_end = self.server_wal_end.max(x.wal_end);
                        self.last_received = self.last_received.max(x.wal_start);
                        Ok(Some(x))
                    }
                    ServerMessage::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        self.server_wal_end = self.server_wal_end.max(wal_end);
                        if reply_requested {
                            self.queue_status(false);
                        }
                        Ok(None)
                    }
                }
            }
            Message::CopyDone => {
                // The server ends the stream: answer with our CopyDone, then wait for
                // CommandComplete and ReadyForQuery.
                if self.state == State::Streaming {
                    frontend::copy_done(&mut self.wire.wbuf);
                    self.state = State::Ending;
                }
                Ok(None)
            }
            Message::CommandComplete(_) => Ok(None),
            Message::ReadyForQuery(_) => {
                self.state = State::Finished;
                Ok(None)
            }
            Message::ErrorResponse(e) => {
                let context = format!("streaming from slot {}", self.slot);
                Err(server_fields(e.fields()).into_error("", &context))
            }
            Message::NoticeResponse(n) => {
                log_notice(n.fields());
                Ok(None)
            }
            Message::ParameterStatus(_) => Ok(None),
            _ => Err(SourceError::protocol(
                "unexpected message while streaming (expected CopyData)",
            )),
        }
    }

    /// Ends the stream cleanly: a last status update with the marked position, CopyDone, then
    /// waits for the server's CommandComplete/ReadyForQuery (skipping data still in flight) and
    /// sends Terminate. Gives up after `idle_timeout`.
    pub async fn shutdown(mut self) -> Result<(), SourceError> {
        let timeout = self.idle_timeout;
        let slot = self.slot.clone();
        let result = tokio::time::timeout(timeout, async {
            if self.state == State::Streaming {
                self.queue_status(false);
                frontend::copy_done(&mut self.wire.wbuf);
                self.state = State::Ending;
            }
            while self.state == State::Ending {
                self.flush_pending().await?;
                let frame = self.wire.recv("replication shutdown").await?;
                match frame {
                    Frame::Msg(Message::CopyDone) => {}
                    f => {
                        self.handle(f)?;
                    }
                }
            }
            frontend::terminate(&mut self.wire.wbuf);
            self.wire.close().await;
            Ok(())
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => Err(SourceError::ConnectionLost {
                last_lsn: Lsn::ZERO,
                reason: format!(
                    "slot {slot}: the server did not end the stream within {timeout:?}"
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::wire::Transport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![b'd'];
        v.extend_from_slice(&(payload.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn xlog(start: u64, end: u64, data: &[u8]) -> Vec<u8> {
        let mut p = vec![b'w'];
        p.extend_from_slice(&start.to_be_bytes());
        p.extend_from_slice(&end.to_be_bytes());
        p.extend_from_slice(&0i64.to_be_bytes());
        p.extend_from_slice(data);
        copy_data(&p)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut p = vec![b'k'];
        p.extend_from_slice(&end.to_be_bytes());
        p.extend_from_slice(&0i64.to_be_bytes());
        p.push(u8::from(reply));
        copy_data(&p)
    }

    /// Reads one standby status update from the "server" side: (write, flush, apply, reply).
    async fn read_status(server: &mut UnixStream) -> (u64, u64, u64, bool) {
        let mut buf = [0u8; 39];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf[..6], &[b'd', 0, 0, 0, 38, b'r']);
        let n = |i: usize| u64::from_be_bytes(buf[i..i + 8].try_into().unwrap());
        (n(6), n(14), n(22), buf[38] == 1)
    }

    #[tokio::test]
    async fn next_is_cancel_safe_answers_keepalives_and_confirms_only_marks() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut s = ReplicationStream::new(
            Wire::new(Transport::Unix(client)),
            "t".into(),
            Lsn::from_u64(100),
        );
        server.write_all(&keepalive(200, true)).await.unwrap();
        let frame = xlog(300, 400, b"Bhello");
        server.write_all(&frame[..7]).await.unwrap();
        // Half a frame: next() waits; dropping it must lose nothing.
        let r = tokio::time::timeout(Duration::from_millis(100), s.next()).await;
        assert!(r.is_err(), "next() returned on half a frame");
        // The keepalive was answered at once, confirming nothing (nothing marked yet).
        assert_eq!(read_status(&mut server).await, (0, 0, 0, false));
        assert_eq!(s.server_wal_end(), Lsn::from_u64(200));
        server.write_all(&frame[7..]).await.unwrap();
        let x = s.next().await.unwrap().unwrap();
        assert_eq!(&x.data[..], b"Bhello");
        assert_eq!(
            (x.wal_start, x.wal_end),
            (Lsn::from_u64(300), Lsn::from_u64(400))
        );

        s.set_flushed(Lsn::from_u64(300));
        s.set_flushed(Lsn::from_u64(250)); // lower: ignored
        s.send_status(true).await.unwrap();
        assert_eq!(read_status(&mut server).await, (300, 300, 300, true));

        drop(server);
        match s.next().await {
            Err(SourceError::ConnectionLost { last_lsn, .. }) => {
                assert_eq!(last_lsn, Lsn::from_u64(400))
            }
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn paused_stream_still_sends_status_updates() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut s =
            ReplicationStream::new(Wire::new(Transport::Unix(client)), "t".into(), Lsn::ZERO)
                .with_status_interval(Duration::from_millis(30));
        server.write_all(&xlog(1, 2, b"Bdata")).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), s.keepalive_while_paused()).await;
        assert!(r.is_err(), "keepalive_while_paused ended: {r:?}");
        for _ in 0..3 {
            assert_eq!(read_status(&mut server).await, (0, 0, 0, false));
        }
        // The data sent meanwhile is still there.
        assert_eq!(&s.next().await.unwrap().unwrap().data[..], b"Bdata");
    }

    /// See: issue #11 item 8. A pause longer than the idle timeout (spill cap, console
    /// `PAUSE`) reads nothing, so the next read must not call the connection lost for it.
    /// The clock is tokio's paused clock: the 2-minute pause takes no real time.
    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_idle_timeout_is_not_a_lost_connection() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut s =
            ReplicationStream::new(Wire::new(Transport::Unix(client)), "t".into(), Lsn::ZERO);
        let pause = DEFAULT_IDLE_TIMEOUT * 2;
        let r = tokio::time::timeout(pause, s.keepalive_while_paused()).await;
        assert!(r.is_err(), "keepalive_while_paused ended: {r:?}");
        // The server kept the connection: it got our status updates all along.
        for _ in 0..(pause.as_secs() / DEFAULT_STATUS_INTERVAL.as_secs()) {
            assert_eq!(read_status(&mut server).await, (0, 0, 0, false));
        }
        server.write_all(&xlog(1, 2, b"Bdata")).await.unwrap();
        match s.next().await {
            Ok(Some(x)) => assert_eq!(&x.data[..], b"Bdata"),
            other => panic!("reading after a long pause: {other:?}"),
        }
    }

    #[tokio::test]
    async fn periodic_status_and_server_errors() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut s =
            ReplicationStream::new(Wire::new(Transport::Unix(client)), "t".into(), Lsn::ZERO)
                .with_status_interval(Duration::from_millis(50));
        s.set_flushed(Lsn::from_u64(77));
        let r = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        assert!(r.is_err());
        assert_eq!(read_status(&mut server).await, (77, 77, 77, false));
        // ErrorResponse: S ERROR, C 42704, M publication "p" does not exist.
        let mut body = Vec::new();
        for (t, v) in [
            (b'S', "ERROR"),
            (b'C', "42704"),
            (b'M', "publication \"p\" does not exist"),
        ] {
            body.push(t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        server.write_all(&msg).await.unwrap();
        match s.next().await {
            Err(SourceError::PublicationMissing { publication }) => assert_eq!(publication, "p"),
            other => panic!("expected PublicationMissing, got {other:?}"),
        }
        assert!(s.next().await.is_err(), "a failed stream stays failed");
    }

    /// An idle source sends nothing while our status updates arrive: after half the idle
    /// timeout the stream asks for a reply, and the answering keepalive keeps it alive.
    #[tokio::test]
    async fn silence_asks_for_a_keepalive_before_counting_as_lost() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let mut s =
            ReplicationStream::new(Wire::new(Transport::Unix(client)), "t".into(), Lsn::ZERO)
                .with_status_interval(Duration::from_secs(3600))
                .with_idle_timeout(Duration::from_millis(200));
        let server_task = tokio::spawn(async move {
            // Answer three reply requests, then fall silent.
            for _ in 0..3 {
                let (_, _, _, reply) = read_status(&mut server).await;
                assert!(
                    reply,
                    "a status update sent for silence must ask for a reply"
                );
                server.write_all(&keepalive(5, false)).await.unwrap();
            }
            server
        });
        let r = tokio::time::timeout(Duration::from_millis(250), s.next()).await;
        assert!(
            r.is_err(),
            "the stream gave up although the server answered: {r:?}"
        );
        match s.next().await {
            Err(SourceError::ConnectionLost { reason, .. }) => {
                assert!(reason.contains("idle timeout"), "{reason}")
            }
            other => panic!("expected ConnectionLost after real silence, got {other:?}"),
        }
        // The server side held the connection open all along.
        let _server = server_task.await.unwrap();
    }

    #[test]
    fn status_update_encoding() {
        let mut out = BytesMut::new();
        encode_status(
            &mut out,
            Lsn::from_u64(0x1_0000_0010),
            Lsn::from_u64(0x20),
            Lsn::from_u64(0x30),
            0x0102_0304_0506_0708,
            true,
        );
        let mut expect = vec![b'd', 0, 0, 0, 38, b'r'];
        expect.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        expect.extend_from_slice(&0x20u64.to_be_bytes());
        expect.extend_from_slice(&0x30u64.to_be_bytes());
        expect.extend_from_slice(&0x0102_0304_0506_0708i64.to_be_bytes());
        expect.push(1);
        assert_eq!(&out[..], &expect[..]);
        assert_eq!(out.len(), 39);
    }

    #[test]
    fn xlogdata_is_parsed_without_copying() {
        let mut p = BytesMut::new();
        p.put_u8(b'w');
        p.put_u64(0x16_B374_D848);
        p.put_u64(0x16_B374_D900);
        p.put_i64(-5);
        p.extend_from_slice(b"Bpayload");
        let payload = p.freeze();
        let base = payload.as_ptr();
        match parse_server_message(payload.clone()).unwrap() {
            ServerMessage::XLogData(x) => {
                assert_eq!(x.wal_start.to_string(), "16/B374D848");
                assert_eq!(x.wal_end.to_string(), "16/B374D900");
                assert_eq!(x.server_time, -5);
                assert_eq!(&x.data[..], b"Bpayload");
                // SAFETY-free pointer comparison: same allocation, offset 25.
                assert_eq!(x.data.as_ptr(), base.wrapping_add(25));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keepalive_and_garbage() {
        let mut p = BytesMut::new();
        p.put_u8(b'k');
        p.put_u64(42);
        p.put_i64(7);
        p.put_u8(1);
        assert_eq!(
            parse_server_message(p.freeze()).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn::from_u64(42),
                server_time: 7,
                reply_requested: true
            }
        );
        for bad in [&b""[..], b"w123", b"k\0\0", b"zzzz"] {
            assert!(
                matches!(
                    parse_server_message(Bytes::copy_from_slice(bad)),
                    Err(SourceError::Protocol { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
