//! Files the server keeps on disk (the embedded default's data dir, its
//! SQLite database, the generated KEK) are the operator's only: the data dir
//! is created 0700 and files 0600, whatever the umask. A database file or
//! KEK file found with looser modes (written by an earlier version) is
//! tightened to 0600 at start. SQLite creates `-wal` and `-shm` with the
//! mode of the database file, so they follow.

use std::{io::Write, path::Path};

/// Creates `dir` (and missing parents) with mode 0700. An existing
/// directory is left as it is, with a warning when others can read it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "the data dir is readable by other users; `chmod 700` it");
            }
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Creates `path` (which must not exist) with mode 0600 and `contents`.
pub fn write_private_new(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Makes an existing file 0600 when group or others have any access.
pub fn tighten(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Prepares an SQLite database file before it is opened: its directory
/// 0700, the file itself created empty with 0600 (an empty file is an
/// empty database to SQLite), and an existing file and its `-wal`/`-shm`
/// tightened to 0600.
pub fn prepare_sqlite_file(file: &Path) -> std::io::Result<()> {
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    match write_private_new(file, b"") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => tighten(file)?,
        Err(e) => return Err(e),
    }
    for suffix in ["-wal", "-shm"] {
        let mut name = file.as_os_str().to_owned();
        name.push(suffix);
        let companion = Path::new(&name);
        if companion.exists() {
            tighten(companion)?;
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn dirs_are_0700_and_files_0600_and_loose_files_are_tightened() {
        let root = tempfile::tempdir().expect("tempdir");
        let file = root.path().join("a/b/db.sqlite");
        prepare_sqlite_file(&file).expect("prepared");
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&root.path().join("a/b")), 0o700);
        assert_eq!(mode(&file), 0o600);
        let wal = root.path().join("a/b/db.sqlite-wal");
        std::fs::write(&wal, b"").expect("wal");
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        prepare_sqlite_file(&file).expect("again");
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&wal), 0o600);
    }
}
