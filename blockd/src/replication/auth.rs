//! The shared secret files, and the HMAC challenge/response the witness protocol uses
//! (`witness/proto.rs`; the link itself authenticates with Noise, `noise.rs`).
//!
//! [`Secrets`] is what the link authenticates with: the current secret, and during a rotation
//! the previous one, read again at every handshake so that a rotation needs no restart.
//!
//! For the MAC, each side sends a fresh random nonce in its HELLO and answers the peer's nonce with
//! `HMAC(secret, "blockd-auth-v1" || peer_nonce || len(own) || own_name || len(peer) || peer_name)`.
//! The names are length-prefixed (one byte each) so that no two name pairs give the same input,
//! and each side puts its own name first, so a MAC cannot be reflected back to its sender. The
//! nonces are fresh per connection, so a recorded answer cannot be replayed. Comparison is in
//! constant time (`hmac`'s `verify_slice`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Domain separation: a MAC of this protocol is never valid anywhere else.
const CONTEXT: &[u8] = b"blockd-auth-v1";

/// Why the secret could not be used or a nonce not drawn.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read secret file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "secret file {path} has mode {mode:04o}: group and others must have no access (chmod 600)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// Loads the shared secret. Refuses a file that group or others may read or write: a secret
/// others can read authenticates nobody. Trailing newlines are kept: both nodes read the same
/// file content, so they agree on the bytes whatever they are.
pub fn load_secret(path: &Path) -> Result<Arc<[u8]>, AuthError> {
    let read = |source| AuthError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Mode { path: path.to_owned(), mode });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    if bytes.is_empty() {
        return Err(AuthError::Empty { path: path.to_owned() });
    }
    Ok(bytes.into())
}

/// Where the link's secrets come from: files read at every handshake (the daemon), or fixed
/// bytes (tests). The first is the current secret: a node dials with it and accepts it; the
/// second, during a rotation, is accepted as well.
#[derive(Debug, Clone)]
pub enum Secrets {
    Files { current: PathBuf, previous: Option<PathBuf> },
    Fixed(Vec<Arc<[u8]>>),
}

impl Secrets {
    /// One fixed secret.
    pub fn fixed(secret: &[u8]) -> Secrets {
        Secrets::Fixed(vec![Arc::from(secret)])
    }

    /// The secrets accepted now, current first. A `previous` file that does not exist is
    /// skipped (removing it ends a rotation); one that exists must pass [`load_secret`].
    pub fn load(&self) -> Result<Vec<Arc<[u8]>>, AuthError> {
        match self {
            Secrets::Fixed(v) if !v.is_empty() => Ok(v.clone()),
            Secrets::Fixed(_) => Err(AuthError::Empty { path: PathBuf::from("(no secret)") }),
            Secrets::Files { current, previous } => {
                let mut v = vec![load_secret(current)?];
                if let Some(p) = previous.as_deref().filter(|p| p.exists()) {
                    v.push(load_secret(p)?);
                }
                Ok(v)
            }
        }
    }
}

/// A fresh random nonce for a HELLO.
pub fn new_nonce() -> Result<[u8; 32], AuthError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

/// A random non-zero u64 (instance ids).
pub fn random_u64() -> Result<u64, AuthError> {
    loop {
        let v = getrandom::u64().map_err(|e| AuthError::Random(e.to_string()))?;
        if v != 0 {
            return Ok(v);
        }
    }
}

fn keyed(secret: &[u8], peer_nonce: &[u8; 32], own: &str, peer: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(CONTEXT);
    m.update(peer_nonce);
    for name in [own, peer] {
        let name = &name.as_bytes()[..name.len().min(255)];
        m.update(&[name.len() as u8]);
        m.update(name);
    }
    m
}

/// The answer node `own` sends to the nonce `peer_nonce` that node `peer` sent it.
pub fn mac(secret: &[u8], peer_nonce: &[u8; 32], own: &str, peer: &str) -> [u8; 32] {
    keyed(secret, peer_nonce, own, peer).finalize().into_bytes().into()
}

/// Checks, in constant time, the answer `peer` sent to the nonce `own_nonce` that `own` sent it.
pub fn verify(
    secret: &[u8],
    own_nonce: &[u8; 32],
    own: &str,
    peer: &str,
    answer: &[u8; 32],
) -> bool {
    keyed(secret, own_nonce, peer, own).verify_slice(answer).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn answer_verifies_on_the_other_side() {
        let (s, n) = (b"secret".as_slice(), [7u8; 32]);
        // b answers a's nonce n; a verifies.
        let answer = mac(s, &n, "b", "a");
        assert!(verify(s, &n, "a", "b", &answer));
    }

    #[test]
    fn wrong_secret_nonce_names_or_reflection_fail() {
        let (s, n) = (b"secret".as_slice(), [7u8; 32]);
        let answer = mac(s, &n, "b", "a");
        assert!(!verify(b"other", &n, "a", "b", &answer));
        assert!(!verify(s, &[8u8; 32], "a", "b", &answer));
        assert!(!verify(s, &n, "a", "c", &answer));
        // a's own answer reflected back to a does not pass as b's.
        assert!(!verify(s, &n, "a", "b", &mac(s, &n, "a", "b")));
        // Length prefixes: ("ab","c") and ("a","bc") differ.
        assert_ne!(mac(s, &n, "ab", "c"), mac(s, &n, "a", "bc"));
    }

    fn secret_file(mode: u32, content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn secret_file_mode_is_checked() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o620, 0o602] {
            let f = secret_file(mode, b"s3cret");
            let e = load_secret(f.path()).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, AuthError::Mode { .. }), "{mode:o}: {msg}");
            assert!(msg.contains(&f.path().display().to_string()), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
        for mode in [0o600, 0o400] {
            let f = secret_file(mode, b"s3cret\n");
            assert_eq!(&*load_secret(f.path()).unwrap(), b"s3cret\n");
        }
    }

    #[test]
    fn empty_or_missing_secret_is_refused() {
        let f = secret_file(0o600, b"");
        assert!(matches!(load_secret(f.path()), Err(AuthError::Empty { .. })));
        let missing = Path::new("/nonexistent/blockd-secret");
        assert!(matches!(load_secret(missing), Err(AuthError::Read { .. })));
    }

    #[test]
    fn secrets_are_read_again_and_a_missing_previous_file_is_skipped() {
        let cur = secret_file(0o600, b"one");
        let prev_path = cur.path().with_extension("previous");
        let s = Secrets::Files { current: cur.path().into(), previous: Some(prev_path.clone()) };
        assert_eq!(s.load().unwrap().len(), 1);
        std::fs::write(&prev_path, b"zero").unwrap();
        std::fs::set_permissions(&prev_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let v = s.load().unwrap();
        assert_eq!((&*v[0], &*v[1]), (&b"one"[..], &b"zero"[..]));
        std::fs::set_permissions(&prev_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(s.load(), Err(AuthError::Mode { .. })));
        std::fs::remove_file(&prev_path).unwrap();
        std::fs::write(cur.path(), b"two").unwrap();
        assert_eq!(&*s.load().unwrap()[0], b"two", "read at every handshake");
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
        assert_ne!(random_u64().unwrap(), 0);
    }
}
