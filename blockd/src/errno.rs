//! The one table of error numbers. An NBD reply (design.md §3) and the link's `Ack` (§6) carry
//! the same values: NBD's, which are Linux's numbers for the few NBD names (checked below). A
//! host error is never passed on raw (NBD-NOTES §1): it is mapped onto this table here, and
//! nowhere else.
//!
//! | value | name      | in an NBD reply or a link `Ack`                   | what produces it                 |
//! |-------|-----------|---------------------------------------------------|----------------------------------|
//! | 0     | [`OK`]    | done                                              | success                          |
//! | 1     | EPERM     | refused: wrong role                               | `VolumeError::NotPrimary`; a Primary refusing its peer's write |
//! | 5     | EIO       | I/O error, or cannot be acknowledged              | any other host error; a Failed disk; `Fenced`; a request left unanswered |
//! | 12    | ENOMEM    | out of memory                                     | (NBD's; not produced)            |
//! | 22    | EINVAL    | invalid request                                   | `OutOfRange`; bad command or flags; unknown volume; a resync block for a node not ready |
//! | 28    | ENOSPC    | no space left (or beyond the end of the export)   | host ENOSPC, EDQUOT, EFBIG; a write beyond the end |
//! | 75    | EOVERFLOW | request too large                                 | a payload over the maximum       |
//! | 95    | ENOTSUP   | not supported                                     | (NBD's)                          |
//! | 108   | ESHUTDOWN | server is shutting down                           | (NBD's)                          |
//!
//! The table also names a few host errors only logs show (EAGAIN, EACCES, ENOSYS: `sys.rs`).
//! Checks of one system call's result (`EINVAL` from `O_DIRECT`, `EOPNOTSUPP` from
//! `fallocate`) stay beside the call: they decide a fallback, they map nothing.

use std::io;

use crate::volume::VolumeError;

/// Success.
pub const OK: u32 = 0;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Every value this crate names: (value, name, message for an NBD error chunk or a log).
const TABLE: &[(u32, &str, &str)] = &[
    (EPERM, "EPERM", "operation not permitted"),
    (EIO, "EIO", "I/O error"),
    (ENOMEM, "ENOMEM", "out of memory"),
    (EINVAL, "EINVAL", "invalid request"),
    (ENOSPC, "ENOSPC", "no space left (or beyond the end of the export)"),
    (EOVERFLOW, "EOVERFLOW", "request too large"),
    (ENOTSUP, "ENOTSUP", "not supported"),
    (ESHUTDOWN, "ESHUTDOWN", "server is shutting down"),
    // Host errors only logs name.
    (libc::EAGAIN as u32, "EAGAIN", "resource temporarily unavailable"),
    (libc::EACCES as u32, "EACCES", "permission denied"),
    (libc::ENOSYS as u32, "ENOSYS", "not implemented"),
];

fn row(value: u32) -> Option<&'static (u32, &'static str, &'static str)> {
    TABLE.iter().find(|(v, _, _)| *v == value)
}

/// The value's name ("EIO"), or "error" for one the table does not hold.
pub fn name(value: u32) -> &'static str {
    row(value).map_or("error", |r| r.1)
}

/// A short text for the value, for NBD error chunks; "error" for one the table does not hold.
pub fn message(value: u32) -> &'static str {
    row(value).map_or("error", |r| r.2)
}

/// The name of a host error's errno ("none" when it carries none, "other" for one not in the
/// table), for logs that people grep.
pub fn host_name(e: &io::Error) -> &'static str {
    e.raw_os_error().map_or("none", |n| row(n as u32).map_or("other", |r| r.1))
}

/// The host errno a backing-store error carries, for the superblock's `disk-failed` record
/// (0 when it carries none).
pub fn raw(e: &io::Error) -> u32 {
    e.raw_os_error().map_or(0, |n| n as u32)
}

/// True when the host error means "out of space" (ENOSPC, EDQUOT, EFBIG): NBD says ENOSPC.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG))
}

/// A host error as it goes to a client or the peer.
pub fn of_io(e: &io::Error) -> u32 {
    if is_no_space(e) {
        ENOSPC
    } else {
        EIO
    }
}

/// A volume error as it goes to an NBD client or, in an `Ack`, to the peer.
pub fn of_volume(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io(io) => of_io(io),
        // Checked before anything is touched; it is the requester's range.
        VolumeError::OutOfRange { .. } => EINVAL,
        VolumeError::Metadata(_) | VolumeError::DirtyLog(_) => EIO,
        // Superseded by the witness lease (fence.rs): not acknowledged, and never will be.
        VolumeError::Fenced { .. } => EIO,
        // The node was demoted under this connection: like a read-only export (NBD-NOTES §2.7).
        VolumeError::NotPrimary => EPERM,
    }
}

/// `Ack` for a result: [`OK`], or the error's value.
pub fn of_result<T>(r: &Result<T, VolumeError>) -> u32 {
    r.as_ref().err().map_or(OK, of_volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NBD's values are Linux's: the host's number and the wire's agree for every name here.
    #[test]
    fn values_are_the_linux_numbers() {
        let linux = [
            (EPERM, libc::EPERM),
            (EIO, libc::EIO),
            (ENOMEM, libc::ENOMEM),
            (EINVAL, libc::EINVAL),
            (ENOSPC, libc::ENOSPC),
            (EOVERFLOW, libc::EOVERFLOW),
            (ENOTSUP, libc::ENOTSUP),
            (ESHUTDOWN, libc::ESHUTDOWN),
        ];
        for (ours, host) in linux {
            assert_eq!(ours, host as u32, "{}", name(ours));
        }
    }

    #[test]
    fn every_value_has_one_row() {
        for (i, (v, n, m)) in TABLE.iter().enumerate() {
            assert!(TABLE[i + 1..].iter().all(|r| r.0 != *v && r.1 != *n), "{n} twice");
            assert_eq!((name(*v), message(*v)), (*n, *m));
        }
        assert_eq!((name(OK), name(9999), message(9999)), ("error", "error", "error"));
    }

    #[test]
    fn host_errors_map_to_eio_or_enospc() {
        let os = io::Error::from_raw_os_error;
        for n in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            assert_eq!(of_io(&os(n)), ENOSPC, "{n}");
        }
        for n in [libc::EIO, libc::EROFS, libc::ENODEV, libc::EINVAL] {
            assert_eq!(of_io(&os(n)), EIO, "never the host's raw errno ({n})");
        }
        assert_eq!(of_io(&io::Error::other("x")), EIO);
        assert_eq!((raw(&os(libc::ENOSPC)), raw(&io::Error::other("x"))), (28, 0));
        let names = [&os(libc::EPERM), &io::Error::other("x"), &os(libc::ENOTDIR)].map(host_name);
        assert_eq!(names, ["EPERM", "none", "other"]);
    }

    #[test]
    fn volume_errors_map_as_the_table_says() {
        let io = |n| VolumeError::Io(io::Error::from_raw_os_error(n));
        assert_eq!(of_volume(&io(libc::EDQUOT)), ENOSPC);
        assert_eq!(of_volume(&io(libc::EIO)), EIO);
        assert_eq!(of_volume(&VolumeError::OutOfRange { offset: 1, len: 2, size: 0 }), EINVAL);
        assert_eq!(of_volume(&VolumeError::NotPrimary), EPERM);
        assert_eq!(of_volume(&VolumeError::Fenced { epoch: 3 }), EIO);
        assert_eq!(of_volume(&VolumeError::DirtyLog(io::Error::other("x"))), EIO);
        assert_eq!(of_result::<()>(&Ok(())), OK);
        assert_eq!(of_result::<()>(&Err(VolumeError::NotPrimary)), EPERM);
    }
}
