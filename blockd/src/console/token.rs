//! The console's access token: 32 random bytes as 64 hex digits in a file of mode 0600
//! (`[console] token-file`, default `<data-dir>/console.token`).
//!
//! The daemon creates it at start when it is missing and reads it again for every action, so
//! `blockctl console token --rotate` takes effect at once, without a restart. Comparison is
//! constant-time: an attacker timing refusals learns nothing about the prefix.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// The file's mode: the token allows swapping the cluster, so root only.
pub const MODE: u32 = 0o600;

/// Hex digits of a token.
const LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the console token {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the console token {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("console token {} has mode {mode:o}; it must be 600 (chmod 600 it)", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("console token {} is not {LEN} hex digits", path.display())]
    Malformed { path: PathBuf },
    #[error("no randomness for a console token: {0}")]
    Random(String),
}

/// The token in `path`; the file must exist with mode 0600 and hold one token.
pub fn read(path: &Path) -> Result<String, TokenError> {
    let meta = fs::metadata(path)
        .map_err(|source| TokenError::Read { path: path.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode { path: path.to_path_buf(), mode });
    }
    let text = fs::read_to_string(path)
        .map_err(|source| TokenError::Read { path: path.to_path_buf(), source })?;
    let token = text.trim();
    if token.len() != LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed { path: path.to_path_buf() });
    }
    Ok(token.to_string())
}

/// The token in `path`, created first when the file does not exist.
pub fn read_or_create(path: &Path) -> Result<String, TokenError> {
    match fs::metadata(path) {
        Ok(_) => read(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => rotate(path),
        Err(source) => Err(TokenError::Read { path: path.to_path_buf(), source }),
    }
}

/// Writes a new token to `path` (mode 0600, replaced atomically) and returns it.
pub fn rotate(path: &Path) -> Result<String, TokenError> {
    let mut bytes = [0u8; LEN / 2];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("token.tmp");
    let write = |source| TokenError::Write { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(write)?;
    }
    let _ = fs::remove_file(&tmp);
    let mut f =
        fs::OpenOptions::new().write(true).create_new(true).mode(MODE).open(&tmp).map_err(write)?;
    f.write_all(format!("{token}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(write)?;
    fs::rename(&tmp, path).map_err(write)?;
    Ok(token)
}

/// Whether `given` is `expected`, in time independent of where they differ.
pub fn matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_with_mode_0600_then_read_back_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/console.token");
        let first = read_or_create(&path).unwrap();
        assert_eq!(first.len(), LEN);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_or_create(&path).unwrap(), first, "an existing token is kept");
        let second = rotate(&path).unwrap();
        assert_ne!(second, first);
        assert_eq!(read(&path).unwrap(), second);
    }

    #[test]
    fn open_mode_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        rotate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read(&path), Err(TokenError::Mode { mode: 0o644, .. })));
        fs::write(&path, "short\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read(&path), Err(TokenError::Malformed { .. })));
    }

    #[test]
    fn comparison() {
        assert!(matches("abc", "abc"));
        assert!(!matches("abd", "abc"));
        assert!(!matches("ab", "abc"));
        assert!(!matches("", "abc"));
    }
}
