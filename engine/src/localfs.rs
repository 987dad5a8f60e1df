//! Local files that hold row data (the spill log, the streamed-transaction spool): created
//! private to the user reshard runs as.
//!
//! In: a path. Out: directories with mode 0700 and files with mode 0600, whatever the umask.
//! Spill segments and spool files hold full row images, so nobody else on the machine may read
//! them (issue #11 item 13).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

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
}
