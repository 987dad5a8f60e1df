//! `reshard peek`: stream the slot and print decoded changes as JSON lines.
//!
//! One line per change (and per begin/commit), with its kind, table, LSNs and column values,
//! through the same decoder and transaction assembly as `reshard run`. With `--no-ack` nothing
//! is confirmed to the slot, so peeking consumes nothing; otherwise each printed transaction's
//! end LSN is confirmed.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use reshard_engine::decode::{AssembleError, Assembler, AssemblerOptions, JsonRenderer};
use reshard_engine::event::TxnEvent;
use reshard_engine::source::{list_slots, max_proto_version, PgOutputOptions, ReplicationClient};
use reshard_engine::Lsn;

use super::source_args::{create_selected_slot, resolve};
use crate::output::{CmdResult, Failure};
use crate::PeekArgs;

/// Why printing stopped.
#[derive(Debug)]
enum PeekStop {
    Limit,
    Decode(AssembleError),
    Io(std::io::Error),
}

impl From<AssembleError> for PeekStop {
    fn from(e: AssembleError) -> Self {
        PeekStop::Decode(e)
    }
}

/// Runs `reshard peek`.
pub async fn run(args: PeekArgs) -> CmdResult {
    let sel = resolve(&args.source)?;
    let sql = sel.connect_sql().await?;
    let exists = list_slots(&sql)
        .await
        .context("listing slots")?
        .iter()
        .any(|s| s.slot_name == sel.slot);
    let mut repl = ReplicationClient::connect(&sel.conn)
        .await
        .context("opening a replication connection to the source")?;
    if !exists {
        if !args.create {
            return Err(Failure::failed(anyhow::anyhow!(
                "replication slot {:?} does not exist on the source; create it with `reshard slot create` or pass --create",
                sel.slot
            )));
        }
        create_selected_slot(&sel, &sql, &mut repl).await?;
        eprintln!(
            "created slot {} and publication {}",
            sel.slot, sel.publication
        );
    }
    let proto_version = max_proto_version(repl.server_version_num());
    let mut stream = repl
        .start_replication(
            &sel.slot,
            Lsn::ZERO,
            PgOutputOptions {
                proto_version: None,
                publication_names: vec![sel.publication.clone()],
                messages: true,
                streaming: true,
                binary: false,
                two_phase: false,
            },
        )
        .await
        .with_context(|| format!("starting replication from slot {}", sel.slot))?;
    let spool = std::env::temp_dir().join(format!("reshard-peek-{}", std::process::id()));
    let mut assembler = Assembler::new(AssemblerOptions {
        stream_dir: spool,
        proto_version,
    })
    .context("setting up transaction assembly")?;
    let mut renderer = JsonRenderer::new();
    let stdout = std::io::stdout();
    let mut changes = 0u64;
    let limit = args.limit.unwrap_or(u64::MAX);
    let idle = args.idle_timeout.map(Duration::from_secs_f64);
    let mut last_end: Option<Lsn> = None;
    // One listener for the whole read: Ctrl-C while a message is being printed is kept.
    let mut signals = reshard_engine::runtime::Signals::new();
    let outcome: Result<(), PeekStop> = loop {
        if changes >= limit {
            break Err(PeekStop::Limit);
        }
        let next = tokio::select! {
            r = next_within(idle, &mut stream) => match r {
                Some(r) => r,
                None => break Ok(()),
            },
            _ = signals.recv() => break Ok(()),
        };
        let Some(x) = next.context("reading from the slot")? else {
            break Ok(());
        };
        let mut out = stdout.lock();
        let r = assembler.push(x.wal_start, x.data, &mut |lsn,
                                                          ev: TxnEvent|
         -> Result<(), PeekStop> {
            if let TxnEvent::Change(_) = &ev {
                if changes >= limit {
                    return Err(PeekStop::Limit);
                }
                changes += 1;
            }
            if let TxnEvent::Commit(c) = &ev {
                last_end = Some(c.end_lsn);
            }
            let line = renderer.render(lsn, &ev);
            writeln!(out, "{line}").map_err(PeekStop::Io)
        });
        drop(out);
        if let Err(e) = r {
            break Err(e);
        }
        if !args.no_ack {
            if let Some(end) = last_end {
                stream.set_flushed(end);
            }
        }
    };
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(()) | Err(PeekStop::Limit) => {}
        Err(PeekStop::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(PeekStop::Io(e)) => {
            return Err(Failure::failed(
                anyhow::Error::from(e).context("writing to stdout"),
            ))
        }
        Err(PeekStop::Decode(e)) => {
            return Err(Failure::failed(
                anyhow::Error::from(e).context("decoding the stream"),
            ))
        }
    }
    if let Err(e) = stream.shutdown().await {
        tracing::debug!(error = %e, "closing the replication connection");
    }
    Ok(())
}

/// The next message, or `None` once `idle` (when given) passed without one.
async fn next_within(
    idle: Option<Duration>,
    stream: &mut reshard_engine::source::ReplicationStream,
) -> Option<Result<Option<reshard_engine::source::XLogData>, reshard_engine::source::SourceError>> {
    match idle {
        Some(d) => tokio::time::timeout(d, stream.next()).await.ok(),
        None => Some(stream.next().await),
    }
}
