//! Values read from files that operators replace while the server runs: the TLS certificate
//! (cert-manager rotates it) and the token file. Both are re-read on a timer and swapped in
//! whole when their bytes change; a bad new version keeps the previous one in force.
//!
//! Polling the bytes, rather than watching inotify events, also sees Kubernetes' secret
//! updates, which swap a symlinked directory instead of writing the files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

/// How often a running server looks for changed certificate and token files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Files that parse into one value, such as a certificate, its key and a CA.
pub trait Source: Send + Sync + 'static {
    /// What the files become.
    type Output: Send + Sync + 'static;
    /// Why they cannot; names the file at fault.
    type Error: std::error::Error + Send + Sync + 'static;

    /// What the value is, for the log ("TLS certificate", "token file").
    fn what(&self) -> &'static str;

    /// The files, in the order [`Source::parse`] receives their bytes.
    fn paths(&self) -> Vec<&Path>;

    /// The value from the files' bytes.
    ///
    /// # Errors
    /// Contents that do not make a usable value.
    fn parse(&self, contents: &[Vec<u8>]) -> Result<Self::Output, Self::Error>;
}

/// Why a source could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError<E: std::error::Error + 'static> {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(E),
}

/// The value of a [`Source`] in force, and the bytes last looked at.
pub struct Reloading<S: Source> {
    source: S,
    current: RwLock<Arc<S::Output>>,
    /// The bytes of the last version tried, good or bad: a bad edit is reported once, not at
    /// every poll, and tried again only when the files change again.
    seen: Mutex<Vec<Vec<u8>>>,
}

impl<S: Source> fmt::Debug for Reloading<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.source.what())
            .field("paths", &self.source.paths())
            .finish_non_exhaustive()
    }
}

impl<S: Source> Reloading<S> {
    /// Reads and parses the files once, at start.
    ///
    /// # Errors
    /// A file that cannot be read (named), or contents the source refuses.
    pub fn load(source: S) -> Result<Arc<Self>, ReloadError<S::Error>> {
        let contents = read_all(&source)?;
        let value = source.parse(&contents).map_err(ReloadError::Invalid)?;
        Ok(Arc::new(Self {
            source,
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(contents),
        }))
    }

    /// The value in force.
    pub fn current(&self) -> Arc<S::Output> {
        match self.current.read() {
            Ok(value) => value.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files and swaps in their value if their bytes changed and parse; returns
    /// whether it did. A failure is logged once per new version of the files.
    pub fn check(&self) -> bool {
        let what = self.source.what();
        let contents = match read_all(&self.source) {
            Ok(contents) => contents,
            // Often a moment between two writes of a rotation: try again next time, quietly.
            Err(error) => {
                tracing::debug!(%error, what, "cannot re-read; keeping the version in force");
                return false;
            }
        };
        let mut seen = match self.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *seen == contents {
            return false;
        }
        let parsed = self.source.parse(&contents);
        *seen = contents;
        match parsed {
            Ok(value) => {
                match self.current.write() {
                    Ok(mut current) => *current = Arc::new(value),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(value),
                }
                tracing::info!(what, "reloaded from changed files");
                true
            }
            Err(error) => {
                tracing::warn!(%error, what, "changed files refused; keeping the version in force");
                false
            }
        }
    }

    /// Checks the files every `every` until the returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let this = this.clone();
                // File reads block: keep them off the async workers.
                let _ = tokio::task::spawn_blocking(move || this.check()).await;
            }
        })
    }
}

fn read_all<S: Source>(source: &S) -> Result<Vec<Vec<u8>>, ReloadError<S::Error>> {
    source
        .paths()
        .into_iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| ReloadError::Read {
                path: path.to_owned(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file holding a number; anything else is refused.
    struct Number(PathBuf);

    #[derive(Debug, thiserror::Error)]
    #[error("not a number")]
    struct NotANumber;

    impl Source for Number {
        type Output = u32;
        type Error = NotANumber;
        fn what(&self) -> &'static str {
            "number"
        }
        fn paths(&self) -> Vec<&Path> {
            vec![&self.0]
        }
        fn parse(&self, contents: &[Vec<u8>]) -> Result<u32, NotANumber> {
            std::str::from_utf8(&contents[0])
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .ok_or(NotANumber)
        }
    }

    #[test]
    fn a_change_is_swapped_in_and_a_bad_one_keeps_the_previous() {
        let dir = std::env::temp_dir().join(format!("audience-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n");
        std::fs::write(&path, "1").unwrap();
        let value = Reloading::load(Number(path.clone())).unwrap();
        assert_eq!(*value.current(), 1);
        assert!(!value.check(), "unchanged files are not reloaded");
        std::fs::write(&path, "2").unwrap();
        assert!(value.check());
        assert_eq!(*value.current(), 2);
        std::fs::write(&path, "two").unwrap();
        assert!(!value.check());
        assert_eq!(*value.current(), 2, "a bad edit keeps the previous value");
        std::fs::remove_file(&path).unwrap();
        assert!(!value.check());
        assert_eq!(
            *value.current(),
            2,
            "a missing file keeps the previous value"
        );
        std::fs::write(&path, "3").unwrap();
        assert!(value.check());
        assert_eq!(*value.current(), 3);
        let missing = Reloading::load(Number(dir.join("absent"))).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
