//! torchrun's error file: where a rank's `@record`
//! (`torch.distributed.elastic.multiprocessing.errors.record`) writes the exception it died
//! of, and how trainvisor reads it back as the root cause of a failure.

use std::path::{Path, PathBuf};

use serde_json::Value;
use uuid::Uuid;

/// Largest error file read; a longer one is cut (a traceback is rarely past a few KiB).
const MAX_BYTES: usize = 64 * 1024;
/// Longest message kept.
const MAX_MESSAGE: usize = 2000;

/// The error file of one incarnation (`TORCHELASTIC_ERROR_FILE`), fresh for each.
pub fn path(data_dir: &Path, job_id: Uuid, rank: u32, attempt: u32) -> PathBuf {
    incarnation_dir(data_dir, job_id, rank, attempt)
        .join(format!("rank-{rank}-attempt-{attempt}.json"))
}

/// The directory of what one incarnation writes for the server to read back (its error file,
/// its Python stacks): a directory of its own, so that a rank in a container gets it mounted
/// and sees no other rank's.
pub fn incarnation_dir(data_dir: &Path, job_id: Uuid, rank: u32, attempt: u32) -> PathBuf {
    data_dir
        .join("errors")
        .join(job_id.to_string())
        .join(format!("rank-{rank}-attempt-{attempt}"))
}

/// What a rank said it died of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootCause {
    /// `ExceptionType: message`.
    pub message: String,
    /// The Python traceback, when the file has one.
    pub traceback: Option<String>,
}

/// Reads an incarnation's error file, if it wrote one; garbage reads as nothing. The rank
/// controls the file: a symlink, FIFO or device reads as nothing too, never blocking.
pub fn read(path: &Path) -> Option<RootCause> {
    parse(&crate::untrusted::read_capped(path, 0, MAX_BYTES).ok()?)
}

/// torch writes `{"message": {"message": "Type: text", "extraInfo": {"py_callstack": "…",
/// "timestamp": "…"}}}`; a message that is a plain string is taken as it is.
pub fn parse(bytes: &[u8]) -> Option<RootCause> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let outer = v.get("message")?;
    let (message, traceback) = match outer {
        Value::String(s) => (s.clone(), None),
        Value::Object(o) => (
            o.get("message")?.as_str()?.to_string(),
            o.get("extraInfo")
                .and_then(|e| e.get("py_callstack"))
                .and_then(Value::as_str)
                .map(str::to_string),
        ),
        _ => return None,
    };
    let message: String = message.trim().chars().take(MAX_MESSAGE).collect();
    (!message.is_empty()).then_some(RootCause {
        message,
        traceback: traceback.filter(|t| !t.trim().is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchs_record_format_and_garbage() {
        let file = br#"{"message": {"message": "RuntimeError: CUDA out of memory",
            "extraInfo": {"py_callstack": "Traceback (most recent call last):\n  File \"t.py\", line 3, in <module>\nRuntimeError: CUDA out of memory\n", "timestamp": "1700000000"}}}"#;
        let cause = parse(file).unwrap();
        assert_eq!(cause.message, "RuntimeError: CUDA out of memory");
        assert!(cause.traceback.unwrap().starts_with("Traceback"));
        assert_eq!(
            parse(br#"{"message": "ValueError: bad"}"#).unwrap().message,
            "ValueError: bad"
        );
        for garbage in [
            &b"not json"[..],
            b"{}",
            b"{\"message\": 3}",
            b"",
            &[0xff, 0xfe],
        ] {
            assert_eq!(parse(garbage), None);
        }
    }
}
