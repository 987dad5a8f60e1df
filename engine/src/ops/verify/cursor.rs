//! Server-side cursors read in fixed-size batches.
//!
//! In: a connection inside a transaction and a query. Out: its rows as text, `FETCH`ed
//! [`FETCH_ROWS`] at a time, so reshard never holds more than one batch per stream however
//! large the table (`DECLARE … CURSOR`,
//! <https://www.postgresql.org/docs/current/sql-declare.html>).

use std::collections::VecDeque;

use tokio_postgres::{Client, SimpleQueryMessage};

/// Rows per `FETCH`.
pub const FETCH_ROWS: usize = 5000;

/// A row in text form (`None` = SQL NULL).
pub type TextRow = Vec<Option<String>>;

/// Something that yields text rows in order: a cursor, or a list in unit tests.
pub trait RowSource {
    /// The next row, `None` at the end.
    fn next_row(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<TextRow>, tokio_postgres::Error>> + Send;
}

/// An open cursor on a connection that is inside a transaction.
pub struct Cursor<'a> {
    client: &'a Client,
    name: String,
    buf: VecDeque<TextRow>,
    done: bool,
}

impl<'a> Cursor<'a> {
    /// `DECLARE name NO SCROLL CURSOR FOR query` (the caller has begun a transaction).
    pub async fn open(
        client: &'a Client,
        name: &str,
        query: &str,
    ) -> Result<Cursor<'a>, tokio_postgres::Error> {
        client
            .batch_execute(&format!("DECLARE {name} NO SCROLL CURSOR FOR {query}"))
            .await?;
        Ok(Cursor {
            client,
            name: name.to_owned(),
            buf: VecDeque::new(),
            done: false,
        })
    }

    async fn fill(&mut self) -> Result<(), tokio_postgres::Error> {
        let msgs = self
            .client
            .simple_query(&format!("FETCH {FETCH_ROWS} FROM {}", self.name))
            .await?;
        let mut n = 0;
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                n += 1;
                self.buf
                    .push_back((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
        }
        if n < FETCH_ROWS {
            self.done = true;
        }
        Ok(())
    }

    /// Closes the cursor (the transaction stays open).
    pub async fn close(self) -> Result<(), tokio_postgres::Error> {
        self.client
            .batch_execute(&format!("CLOSE {}", self.name))
            .await
    }
}

impl RowSource for Cursor<'_> {
    async fn next_row(&mut self) -> Result<Option<TextRow>, tokio_postgres::Error> {
        if self.buf.is_empty() && !self.done {
            self.fill().await?;
        }
        Ok(self.buf.pop_front())
    }
}

impl RowSource for VecDeque<TextRow> {
    async fn next_row(&mut self) -> Result<Option<TextRow>, tokio_postgres::Error> {
        Ok(self.pop_front())
    }
}

/// A [`RowSource`] with one row of look-ahead.
pub struct Peeked<S> {
    inner: S,
    head: Option<TextRow>,
    started: bool,
}

impl<S: RowSource> Peeked<S> {
    /// Wraps a source.
    pub fn new(inner: S) -> Self {
        Peeked {
            inner,
            head: None,
            started: false,
        }
    }

    /// The next row without consuming it.
    pub async fn peek(&mut self) -> Result<Option<&TextRow>, tokio_postgres::Error> {
        if !self.started {
            self.started = true;
            self.head = self.inner.next_row().await?;
        }
        Ok(self.head.as_ref())
    }

    /// The next row as the last [`Peeked::peek`] or [`Peeked::pop`] read it, without reading
    /// (`None` at the end, and before the first of them).
    pub fn head(&self) -> Option<&TextRow> {
        self.head.as_ref()
    }

    /// Consumes the next row.
    pub async fn pop(&mut self) -> Result<Option<TextRow>, tokio_postgres::Error> {
        self.peek().await?;
        let row = self.head.take();
        self.head = self.inner.next_row().await?;
        Ok(row)
    }

    /// The wrapped source.
    pub fn into_inner(self) -> S {
        self.inner
    }
}
