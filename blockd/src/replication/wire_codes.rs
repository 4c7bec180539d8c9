//! The one-byte codes of roles and disk states on the wire.

use super::WireError;
use crate::control::{DiskState, Role};

pub(super) fn role_from(kind: u16, v: u64) -> Result<Role, WireError> {
    match v {
        1 => Ok(Role::Primary),
        2 => Ok(Role::Secondary),
        _ => Err(WireError::Field { kind, field: "role", value: v }),
    }
}

pub(super) fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

pub(super) fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 1,
        DiskState::Outdated => 2,
        DiskState::Inconsistent => 3,
        DiskState::Failed => 4,
    }
}

pub(super) fn disk_from(kind: u16, v: u8) -> Result<DiskState, WireError> {
    match v {
        1 => Ok(DiskState::UpToDate),
        2 => Ok(DiskState::Outdated),
        3 => Ok(DiskState::Inconsistent),
        4 => Ok(DiskState::Failed),
        _ => Err(WireError::Field { kind, field: "disk", value: u64::from(v) }),
    }
}
