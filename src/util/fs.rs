//! Atomic file writes, once for the whole crate: the content goes to a temporary sibling that is
//! synced and then renamed over the destination, so a reader (or a run killed half-way) sees the
//! old file or the new one, never part of one. GGUF files, the reference cache and eval reports
//! are written this way; exports and checkpoints build their directory protocols on
//! [`sibling`] and [`sync_dir`].

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`write_atomic`] can fail with: a file-system step on `path`, or the writer's own error.
#[derive(Debug)]
pub enum AtomicError<E> {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Write(E),
}

/// The folder `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A hidden sibling of `path` unique to this process and call: `.<name>.<tag>-<pid>-<n>`.
pub fn sibling(path: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

/// Makes renames in `dir` durable where the platform can sync a directory (best effort).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `path` atomically: `write` fills a buffered temporary sibling, which is synced and
/// renamed over `path`; the temporary file is removed on any error, and an existing `path` is
/// then left as it was.
pub fn write_atomic<E>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), AtomicError<E>> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AtomicError::Io { path: p, source }
    };
    if path.file_name().is_none() {
        return Err(io(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        )));
    }
    let tmp = sibling(path, "tmp");
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut bw = BufWriter::with_capacity(1 << 20, f);
        write(&mut bw).map_err(AtomicError::Write)?;
        let f = bw.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(&parent_dir(path));
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of a byte string.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, |w| w.write_all(bytes)).map_err(|e| match e {
        AtomicError::Io { source, .. } | AtomicError::Write(source) => source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_or_not_at_all_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        write_bytes_atomic(&p, b"first").unwrap();
        write_bytes_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        // A writer that fails half-way leaves the old content and no temporary file.
        let r = write_atomic(&p, |w| {
            w.write_all(b"half")?;
            Err::<(), _>(std::io::Error::other("stopped"))
        });
        assert!(matches!(r, Err(AtomicError::Write(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.txt")]);
        // A missing folder is an error naming the temporary path's folder.
        let bad = dir.path().join("no/such/dir/x");
        match write_atomic(&bad, |_| Ok::<(), std::io::Error>(())) {
            Err(AtomicError::Io { path, .. }) => assert!(path.starts_with(dir.path().join("no"))),
            other => panic!("{other:?}"),
        }
    }
}
