//! The witness's state file (`--state FILE`): the lease table's [`Record`] as one small JSON
//! object, replaced atomically.
//!
//! Durability: [`save`] writes `FILE.tmp`, fsyncs it, renames it over `FILE` and fsyncs the
//! directory, and the server answers a grant that changes the holder only after `save`
//! returned. A crash at any point leaves either the old or the new record, never a torn one,
//! and a node can only hold an epoch that is on disk.
//!
//! A file that exists but cannot be read or parsed stops the witness (see [`StateError`]):
//! starting fresh would restart epochs at 1 and could grant a second lease while the old one
//! runs; guessing is worse than not answering. `changed-at` (wall-clock seconds of the last
//! change of holder) is for people reading the file; no decision uses it, since wall clocks
//! jump.

use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::lease::Record;

/// The `format` field: a file of anything else is refused.
const FORMAT: &str = "blockd-witness-state";
const FORMAT_VERSION: u32 = 1;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read witness state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "witness state file {} is corrupt ({why}); refusing to start, because a fresh start \
         could grant an epoch twice. If no node can still hold a lease from this witness (one \
         term has passed since it stopped), move the file away to start fresh",
        path.display()
    )]
    Corrupt { path: PathBuf, why: String },
    #[error("cannot write witness state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OnDisk {
    format: String,
    version: u32,
    epoch: u64,
    holder: Option<String>,
    term_ms: u64,
    changed_at: u64,
    /// The holder's last grant was degraded; absent in files of witnesses before the flag
    /// (unknown, which nodes treat as "may have been").
    #[serde(default)]
    degraded: Option<bool>,
}

/// The record in `path`, or None when there is no file (a witness that never ran).
pub fn load(path: &Path) -> Result<Option<Record>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == ErrorKind::InvalidData => return Err(corrupt(path, "not UTF-8")),
        Err(source) => return Err(StateError::Read { path: path.to_owned(), source }),
    };
    let disk: OnDisk = serde_json::from_str(&text).map_err(|e| corrupt(path, &e.to_string()))?;
    if disk.format != FORMAT || disk.version != FORMAT_VERSION {
        let why = format!("format {:?} version {}", disk.format, disk.version);
        return Err(corrupt(path, &why));
    }
    if disk.holder.is_some() != (disk.epoch > 0) || disk.term_ms == 0 {
        return Err(corrupt(path, "epoch, holder and term disagree"));
    }
    let term = Duration::from_millis(disk.term_ms);
    Ok(Some(Record { epoch: disk.epoch, holder: disk.holder, term, degraded: disk.degraded }))
}

fn corrupt(path: &Path, why: &str) -> StateError {
    StateError::Corrupt { path: path.to_owned(), why: why.to_string() }
}

/// Replaces `path` with `record`, durably (see the module doc).
pub fn save(path: &Path, record: &Record) -> Result<(), StateError> {
    let write = |source| StateError::Write { path: path.to_owned(), source };
    let changed_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let disk = OnDisk {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        epoch: record.epoch,
        holder: record.holder.clone(),
        // Rounded up: a restart must wait at least the whole term.
        term_ms: u64::try_from(record.term.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
        changed_at,
        degraded: record.degraded,
    };
    let mut text = serde_json::to_string_pretty(&disk).map_err(|e| write(e.into()))?;
    text.push('\n');
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(write)?;
    f.write_all(text.as_bytes()).map_err(write)?;
    f.sync_all().map_err(write)?;
    drop(f);
    fs::rename(&tmp, path).map_err(write)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: u64, holder: Option<&str>) -> Record {
        let term = Duration::from_millis(1500);
        Record { epoch, holder: holder.map(String::from), term, degraded: Some(epoch % 2 == 0) }
    }

    #[test]
    fn missing_file_is_a_fresh_witness() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&dir.path().join("state")).unwrap(), None);
    }

    #[test]
    fn saved_record_loads_back_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        for r in [rec(0, None), rec(1, Some("alpha")), rec(u64::MAX, Some("beta"))] {
            save(&path, &r).unwrap();
            assert_eq!(load(&path).unwrap(), Some(r));
        }
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state"]);
    }

    #[test]
    fn sub_millisecond_terms_round_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let r = Record { term: Duration::from_micros(1001), ..rec(1, Some("a")) };
        save(&path, &r).unwrap();
        assert_eq!(load(&path).unwrap().map(|r| r.term), Some(Duration::from_millis(2)));
    }

    #[test]
    fn corrupt_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let good = r#"{"format":"blockd-witness-state","version":1,"epoch":1,"holder":"a",
                       "term-ms":10,"changed-at":0}"#;
        let edit = |from: &str, to: &str| good.replace(from, to).into_bytes();
        let bad: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"{".to_vec(),
            b"\xff\xfe".to_vec(),
            edit("\"epoch\":1", "\"epoch\":0"),
            edit("\"version\":1", "\"version\":2"),
            edit("\"term-ms\":10", "\"term-ms\":0"),
            edit("\"holder\":\"a\"", "\"holder\":null"),
            edit("}", ",\"x\":1}"),
        ];
        fs::write(&path, good).unwrap();
        let old = load(&path).unwrap().expect("the template itself is valid");
        assert_eq!(old.degraded, None, "a file from before the flag: unknown");
        for b in bad {
            fs::write(&path, b).unwrap();
            let e = load(&path).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, StateError::Corrupt { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()) && msg.contains("refusing"), "{msg}");
        }
    }

    #[test]
    fn unwritable_directory_is_an_error_naming_the_file() {
        let path = Path::new("/nonexistent/blockd-witness/state");
        let msg = save(path, &rec(1, Some("a"))).unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/blockd-witness/state"), "{msg}");
    }
}
