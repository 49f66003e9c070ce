//! Server-side imports confined to one directory (`import_dir`).
//!
//! A path is opened once, and the file that was opened is what gets checked: its real path,
//! read back from the open descriptor, must lie inside the directory. Checking a path and then
//! opening it would let a link swapped in between point the open elsewhere.
//!
//! Every refusal (no such file, outside the directory, a link leading out, not a regular file)
//! is the same error to the caller, so that it cannot probe the server's file system; the
//! reason goes to the server's log.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use super::error::EngineError;
use super::Result;

/// The directory server-side imports may read from.
#[derive(Debug, Clone)]
pub struct ImportDir {
    /// Absolute, as configured (links not resolved: they may be swapped while the server runs).
    root: PathBuf,
}

impl ImportDir {
    /// The directory at `root` (a relative one is taken from the working directory).
    pub fn new(root: &Path) -> Self {
        Self {
            // Without a working directory it stays relative, and compares as given.
            root: std::path::absolute(root).unwrap_or_else(|_| root.to_owned()),
        }
    }

    /// Opens `requested`, absolute or relative to the directory, for reading.
    ///
    /// # Errors
    /// [`EngineError::ImportRefused`] unless it is a regular file inside the directory once
    /// every link is resolved.
    pub fn open(&self, requested: &Path) -> Result<File> {
        let refused = |reason: String| EngineError::ImportRefused(reason);
        let real_root = std::fs::canonicalize(&self.root)
            .map_err(|e| refused(format!("import_dir {}: {e}", self.root.display())))?;
        // Nothing outside is even opened, as far as the name tells (opening a device or a
        // FIFO can have effects); links are for the check after the open.
        let named = lexical_path(&self.root, requested)
            .filter(|path| path.starts_with(&self.root) || path.starts_with(&real_root))
            .ok_or_else(|| refused("the path names a place outside import_dir".into()))?;
        let file = open_nonblocking(&named).map_err(|e| refused(e.to_string()))?;
        let metadata = file.metadata().map_err(|e| refused(e.to_string()))?;
        if !metadata.is_file() {
            return Err(refused("not a regular file".into()));
        }
        let opened = real_path(&file).map_err(|e| refused(format!("real path: {e}")))?;
        if !opened.starts_with(&real_root) {
            return Err(refused(format!(
                "resolves to {}, outside import_dir",
                opened.display()
            )));
        }
        Ok(file)
    }
}

/// `requested` taken from `root` when relative, with `.` and `..` resolved by name.
/// `None` when `..` climbs above `/`.
fn lexical_path(root: &Path, requested: &Path) -> Option<PathBuf> {
    let joined = root.join(requested);
    let mut path = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::Normal(_) => {
                path.push(component)
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !path.pop() {
                    return None;
                }
            }
        }
    }
    Some(path)
}

/// Opens for reading without waiting for a FIFO's writer and without taking a terminal.
#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

/// The path of the file `file` has open, every link resolved, as the kernel names it.
#[cfg(target_os = "linux")]
fn real_path(file: &File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Elsewhere no descriptor can name its file: server-side imports are refused.
#[cfg(not(target_os = "linux"))]
fn real_path(_file: &File) -> std::io::Result<PathBuf> {
    Err(std::io::Error::other(
        "server-side imports need Linux (/proc/self/fd)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_dots_and_stay_below_the_root() {
        let root = Path::new("/data/in");
        let cases = [
            ("users.parquet", Some("/data/in/users.parquet")),
            ("./a/../users.parquet", Some("/data/in/users.parquet")),
            ("../in/users.parquet", Some("/data/in/users.parquet")),
            ("../out.parquet", Some("/data/out.parquet")),
            ("/etc/hostname", Some("/etc/hostname")),
            ("/../../x", None),
        ];
        for (requested, expected) in cases {
            assert_eq!(
                lexical_path(root, Path::new(requested)),
                expected.map(PathBuf::from),
                "{requested}"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_regular_files_inside_open() {
        let base = std::env::temp_dir().join(format!("audience-import-dir-{}", std::process::id()));
        let root = base.join("in");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/users.arrow"), b"inside").unwrap();
        std::fs::write(base.join("secret.arrow"), b"outside").unwrap();
        std::os::unix::fs::symlink(base.join("secret.arrow"), root.join("escape.arrow")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/users.arrow"), root.join("alias.arrow")).unwrap();
        let dir = ImportDir::new(&root);
        for inside in ["sub/users.arrow", "alias.arrow", "sub/../alias.arrow"] {
            assert!(dir.open(Path::new(inside)).is_ok(), "{inside}");
        }
        assert!(dir.open(&root.join("sub/users.arrow")).is_ok());
        for refused in [
            "escape.arrow",
            "../secret.arrow",
            "missing.arrow",
            "sub",
            "/etc/hostname",
            "/dev/null",
        ] {
            let error = dir.open(Path::new(refused)).unwrap_err();
            assert!(
                matches!(error, EngineError::ImportRefused(_)),
                "{refused}: {error}"
            );
            assert_eq!(
                error.to_string(),
                EngineError::ImportRefused(String::new()).to_string(),
                "every refusal says the same"
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
