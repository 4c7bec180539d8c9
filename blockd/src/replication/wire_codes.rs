//! The one-byte codes of roles and disk states on the wire, and the payloads with structure
//! (HELLO, PARAMS, STATE).

use bytes::{Buf, Bytes};

use super::{get_gens, utf8, Header, Message, VolumeParams, WireError, MAX_VOLUMES};
use crate::resync::Resolve;
use crate::role::{DiskState, Role};

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

/// A u8-length-prefixed UTF-8 string.
fn get_name(kind: u16, p: &mut Bytes) -> Result<String, WireError> {
    let short = WireError::Payload { kind, what: "truncated name" };
    if p.remaining() < 1 {
        return Err(short);
    }
    let n = usize::from(p.get_u8());
    if p.remaining() < n {
        return Err(short);
    }
    let s = utf8(kind, &p[..n])?;
    p.advance(n);
    Ok(s)
}

pub(super) fn parse_hello(h: &Header, p: &mut Bytes) -> Result<Message, WireError> {
    let kind = h.kind;
    let node = get_name(kind, p)?;
    if p.remaining() != 8 + 1 {
        return Err(WireError::Payload { kind, what: "hello of the wrong length" });
    }
    let instance = p.get_u64();
    let encrypt = match p.get_u8() {
        0 => false,
        1 => true,
        v => return Err(WireError::Field { kind, field: "encrypt", value: v.into() }),
    };
    Ok(Message::Hello { version: h.version, node, instance, encrypt })
}

pub(super) fn parse_params(kind: u16, p: &mut Bytes) -> Result<Message, WireError> {
    let count = usize::from(p.get_u16());
    if count > MAX_VOLUMES {
        return Err(WireError::Field { kind, field: "volumes", value: count as u64 });
    }
    // Reserved for what the payload can hold (a volume takes at least 25 bytes), not for what
    // the count claims: a short frame must not make the link allocate for 1024 volumes.
    let mut volumes = Vec::with_capacity(count.min(p.remaining() / 25));
    for _ in 0..count {
        let name = get_name(kind, p)?;
        if p.remaining() < 8 + 4 + 8 + 4 {
            return Err(WireError::Payload { kind, what: "truncated volume parameters" });
        }
        let (size, granularity) = (p.get_u64(), p.get_u32());
        let (al_extent_size, al_extents) = (p.get_u64(), p.get_u32());
        volumes.push(VolumeParams { name, size, granularity, al_extent_size, al_extents });
    }
    if p.has_remaining() {
        return Err(WireError::Payload { kind, what: "trailing bytes" });
    }
    Ok(Message::Params { volumes })
}

pub(super) fn parse_state(kind: u16, p: &mut Bytes) -> Result<Message, WireError> {
    let role = role_from(kind, u64::from(p.get_u8()))?;
    let disk = disk_from(kind, p.get_u8())?;
    let bits = p.get_u8();
    let primary_when_stopped = bits & 1 != 0;
    let resolve = match bits >> 1 {
        0 => Resolve::None,
        1 => Resolve::DiscardLocal,
        2 => Resolve::FullSync,
        _ => return Err(WireError::Field { kind, field: "state flags", value: bits.into() }),
    };
    let gens = get_gens(p);
    Ok(Message::State { role, disk, gens, primary_when_stopped, dirty: p.get_u64(), resolve })
}
