//! Harness for blockd's integration tests: real daemons, real clients, real mounts.
//!
//! Module map (what each owns, and what it must not do):
//!
//! - [`cmd`]: finding the built binaries, `require` (loud failure when a tool or root is
//!   missing; never a silent skip), and `run` helpers with timeouts whose panics carry the
//!   command's stdout and stderr.
//! - [`node`]: [`TestDir`] (a private directory under /var/tmp per test) and [`Node`], a guard
//!   around one `blockd` process: writes its configuration, starts it, waits for its sockets,
//!   stops it with SIGTERM (asserting exit 0) or SIGKILL, and kills it by pid on drop.
//! - [`mounts`]: [`NbdFuse`] (an NBD export presented as a file by nbdfuse) and [`LoopMount`]
//!   (a loop device on that file, optionally mounted). Both undo themselves on drop.
//! - [`cluster`]: [`cluster::Cluster`], two daemons ("alpha", "beta") in network namespaces
//!   joined by veth, with `start`/`stop`/`kill`/`freeze`/`thaw`, nftables `cut`/`cut_one_way`/
//!   `heal`, `role`, `status`, `wait_for` and `assert_identical`; undoes all of it on drop.
//! - [`disk`]: [`disk::FaultDisk`], a backing file that fails like a real disk (a volatile write
//!   cache lost at a power cut, errors on demand, hangs, delays): nbdkit filters behind nbdfuse.
//! - [`witness`]: [`witness::WitnessNet`], a real `blockd witness` in its own network namespace
//!   with node namespaces around it, and lease clients that ask from those namespaces.
//! - [`nbd`]: a raw NBD client over `std::os::unix::net::UnixStream` for the malformed and
//!   corner cases no well-behaved client sends. Pure byte building lives here, not in tests.
//!
//! Every test runs in parallel with the others, so every path (config, sockets, mount points,
//! scratch files) lives inside that test's own [`TestDir`]. Cleanup runs in `Drop`, so it also
//! runs when an assertion panics; locals drop in reverse order, which is the order teardown
//! needs (mount → loop → FUSE → daemon → directory).

pub mod browser;
pub mod cluster;
pub mod cmd;
pub mod disk;
pub mod mounts;
pub mod nbd;
pub mod node;
pub mod witness;

pub use cmd::{require, require_root, run, run_timeout, try_run, Background, Output};
pub use mounts::{LoopMount, NbdFuse};
pub use node::{Node, TestDir};

/// `[storage] allocate` for the daemons tests start (`BLOCKD_STORAGE__ALLOCATE`; a test's own
/// environment overrides it). Sparse: hundreds of tests with volumes up to GiBs would otherwise
/// reserve all of it in /var/tmp, and the resync tests count the holes they skip. The default
/// ("full") is tested where it matters (tests/tests/diskerror.rs).
pub const TEST_ALLOCATE: &str = "sparse";

/// Removes the test suite's own variables (`BLOCKD_TEST_KEEP`, `BLOCKD_POWERCUT_*`) from the
/// environment of a blockd or blockctl command: their `BLOCKD_` prefix would make them
/// configuration keys there, unknown ones, and the daemon would refuse to start.
pub fn without_test_knobs(c: &mut std::process::Command) -> &mut std::process::Command {
    c.env_remove("BLOCKD_TEST_KEEP");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BLOCKD_POWERCUT_") {
            c.env_remove(key);
        }
    }
    c
}

/// Deterministic pseudo-random bytes (xorshift64*), so a test can regenerate what it wrote
/// instead of keeping it in memory, and so a failure reproduces with the same data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts two byte strings are equal; on failure reports the lengths and the first
/// differing offset with a few bytes of context instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let window = |b: &[u8]| b[first.min(b.len())..(first + 16).min(b.len())].to_vec();
    panic!(
        "{what}: data differs (got {} bytes, want {}); first difference at byte {first}: \
         got {:02x?}, want {:02x?}",
        got.len(),
        want.len(),
        window(got),
        window(want)
    );
}

/// Unwraps a raw READ result and compares it with [`assert_bytes_eq`].
#[track_caller]
pub fn assert_read(got: Result<Vec<u8>, u32>, want: &[u8], what: &str) {
    match got {
        Ok(data) => assert_bytes_eq(&data, want, what),
        Err(e) => panic!("{what}: READ failed with NBD error {e}"),
    }
}

/// Parses a size the way the config does for the common suffixes (`KiB`, `MiB`, `GiB`), so
/// tests state sizes once, as strings, in the config they write.
pub fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s {
        s if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        s if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        s if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        s => (s, 1),
    };
    num.trim().parse::<u64>().unwrap_or_else(|e| panic!("test size {s:?}: {e}")) * mult
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(3, 13).len(), 13);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), 64 << 20);
        assert_eq!(parse_size("4096"), 4096);
        assert_eq!(parse_size("1GiB"), 1 << 30);
    }
}
