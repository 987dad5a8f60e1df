//! The PostgreSQL toolkit: what every stage and command needs to talk to a PostgreSQL server,
//! defined once. It imports the ground only (one known exception: [`conn`] takes the source
//! stage's `ConnConfig`, the one parsed connection description).
//!
//! - [`conn`]: connections, error text, the source's present LSN.
//! - [`sql`]: quoting (literals, identifiers, qualified names) and the [`sql::TableName`] type.
//! - [`catalog`]: THE table-set resolver (run, check, verify, cutover, status) and the publication.
//! - [`copy_text`]: COPY text's field escapes, one decoder.
//! - [`table`]: one table described (columns, keys, replica identity).
//! - [`progress`]: the `reshard.progress` rows on the shards, one reader and one writer.
//! - [`fence`]: the write fences' record (`reshard.fence`), one reader.
//! - [`distinct`]: every configured shard is its own database and holds its own progress.
//! - [`identity`]: where a table's shard key stands relative to its replica identity.
//! - [`reverse`]: the `reshard.reverse` rows on the source (a shard's writes streaming back
//!   after its cutover), and the slot, publication and origin names of that direction.

pub mod catalog;
pub mod conn;
pub mod copy_text;
pub mod distinct;
pub mod fence;
pub mod identity;
pub mod progress;
pub mod reverse;
pub mod sql;
pub mod table;
