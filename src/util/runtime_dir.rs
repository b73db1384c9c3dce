//! A private `XDG_RUNTIME_DIR` for processes started without a valid one (ssh sessions, CI,
//! containers). Mesa's Vulkan drivers (lavapipe included) go through libwayland, which prints
//! "error: XDG_RUNTIME_DIR is invalid or not set in the environment." to stderr when the variable
//! is unset; the binary calls [`private_runtime_dir`] before wgpu starts and sets the variable to
//! the directory it returns.

use std::path::{Path, PathBuf};

/// Whether `dir` is usable as `XDG_RUNTIME_DIR`: an existing directory owned by this user with
/// mode 0700 (what the XDG base-directory specification requires).
pub fn is_valid_runtime_dir(dir: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    if !meta.is_dir() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let uid = current_uid();
        if uid.is_some_and(|u| meta.uid() != u) || meta.permissions().mode() & 0o077 != 0 {
            return false;
        }
    }
    true
}

#[cfg(unix)]
fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the process's effective user on Linux; elsewhere fall back to
    // a freshly created temporary file.
    if let Ok(m) = std::fs::metadata("/proc/self") {
        return Some(m.uid());
    }
    let probe = std::env::temp_dir().join(format!("bfpo-lite-uid-{}", std::process::id()));
    let uid = std::fs::File::create(&probe)
        .and_then(|_| std::fs::metadata(&probe))
        .map(|m| m.uid())
        .ok();
    let _ = std::fs::remove_file(&probe);
    uid
}

/// When `current` (the value of `XDG_RUNTIME_DIR`) is unset or not a valid runtime directory,
/// creates (or reuses) a private one, `<tmp>/bfpo-lite-runtime-<uid>` with mode 0700, and returns
/// it; `None` when `current` is fine or no private directory could be made.
pub fn private_runtime_dir(current: Option<&Path>) -> Option<PathBuf> {
    if current.is_some_and(is_valid_runtime_dir) {
        return None;
    }
    #[cfg(unix)]
    let suffix = current_uid().map(|u| u.to_string()).unwrap_or_default();
    #[cfg(not(unix))]
    let suffix = String::new();
    let dir = std::env::temp_dir().join(format!("bfpo-lite-runtime-{suffix}"));
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        if b.create(&dir).is_err() && !dir.is_dir() {
            return None;
        }
    }
    is_valid_runtime_dir(&dir).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_or_unset_dirs_get_a_private_one() {
        let d = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        assert_eq!(private_runtime_dir(Some(d.path())), None);
        for bad in [None, Some(Path::new("/nonexistent/xdg"))] {
            let p = private_runtime_dir(bad).expect("a private directory");
            assert!(is_valid_runtime_dir(&p), "{}", p.display());
        }
    }
}
