//! Local files that hold row data (the spill log, the streamed-transaction spool): created
//! private to the user reshard runs as.
//!
//! In: a path. Out: directories with mode 0700 and files with mode 0600, whatever the umask.
//! Spill segments and spool files hold full row images, so nobody else on the machine may read
//! them (issue #11 item 13). A file that is rewritten whole is replaced atomically
//! ([`replace_file`]).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every directory reshard creates for row data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file reshard creates for row data.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700; an existing `dir` is narrowed to 0700
/// (a directory made by an older version, or by hand). Parents that exist are left alone.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != DIR_MODE {
        std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// `OpenOptions` whose `create`/`create_new` make the file with mode 0600. Set the access
/// flags (`read`, `write`, `create`, …) on the result as usual.
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// A file operation that failed: the step (`create`, `write`, `rename`, `fsync directory`),
/// the file or directory, and the OS error. Each caller wraps it in its own error.
#[derive(Debug)]
pub struct FileError {
    /// What was being done.
    pub op: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

/// Replaces `path` with a private file holding `bytes`, atomically: written to `tmp` and
/// synced, renamed over `path`, then the directory synced. After a crash `path` holds the old
/// content or the new, never a mix. Returns the new file (open for writing, at its end).
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<File, FileError> {
    fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
        move |source| FileError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
    let mut f = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(err("create", tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_data())
        .map_err(err("write", tmp))?;
    std::fs::rename(tmp, path).map_err(err("rename", tmp))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync directory", dir))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_are_0700_and_files_0600_whatever_the_umask() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        create_private_dir_all(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "an existing directory is narrowed");
        let fresh = base.path().join("c/d");
        create_private_dir_all(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let f = fresh.join("f");
        private_file()
            .write(true)
            .create_new(true)
            .open(&f)
            .unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn replace_file_swaps_the_content_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (path, tmp) = (dir.path().join("f"), dir.path().join("f.tmp"));
        std::fs::write(&path, b"old old old").unwrap();
        let mut f = replace_file(&path, &tmp, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp.exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        f.write_all(b"+").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"new+",
            "the file returned is the new one"
        );
        let e = replace_file(
            &dir.path().join("no/such/f"),
            &dir.path().join("no/such/t"),
            b"",
        )
        .unwrap_err();
        assert_eq!(e.op, "create");
        assert!(e.path.ends_with("no/such/t"), "{:?}", e.path);
    }
}
