//! The control requests `attach` and `detach` (blockctl's kernel attach step), answered with
//! the control socket's reply and error kinds.

use std::sync::Arc;

use super::{KernelAttach, KernelError};
use crate::{
    control::{ErrorKind, Reply, Response},
    volume::Volume,
};

fn find<'a>(volumes: &'a [Arc<Volume>], name: &str) -> Result<&'a Arc<Volume>, Response> {
    let found = volumes.iter().find(|v| v.name() == name);
    found.ok_or_else(|| Response::err(ErrorKind::NotFound, format!("no volume {name}")))
}

/// `{"cmd":"attach","volume":NAME}` → `{"ok":{"attached":{"device":"/dev/nbdN"}}}`.
pub async fn attach(k: &KernelAttach, volumes: &[Arc<Volume>], name: &str) -> Response {
    let volume = match find(volumes, name) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match k.attach(volume).await {
        Ok(device) => Response::Ok(Reply::Attached { device }),
        Err(e @ KernelError::NotServing(..)) => Response::err(ErrorKind::NotPrimary, e.to_string()),
        Err(e) => Response::err(ErrorKind::Internal, with_causes(&e)),
    }
}

/// `{"cmd":"detach","volume":NAME}` → `{"ok":"done"}`.
pub async fn detach(k: &KernelAttach, volumes: &[Arc<Volume>], name: &str) -> Response {
    if let Err(r) = find(volumes, name) {
        return r;
    }
    match k.detach(name).await {
        Ok(()) => Response::Ok(Reply::Done),
        Err(e) => Response::err(ErrorKind::Internal, with_causes(&e)),
    }
}

/// `e` and its causes on one line: "the kernel refused NBD_CMD_CONNECT: Invalid argument".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        text.push_str(": ");
        text.push_str(&c.to_string());
        next = c.source();
    }
    text
}
