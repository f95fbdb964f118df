//! The API token kept in a file (`--api-token-file`, `TRAINVISOR_API_TOKEN_FILE`; the container
//! image points it at `/data/api-token`): read when the file exists, otherwise generated on
//! first start, written with mode 0600 and shown once in the log, as notebook servers do. A
//! container must listen on a non-loopback address, and the server refuses that without a
//! token; this makes `docker run` secure by default and still a one-liner. A token given
//! directly (`--api-token`, `TRAINVISOR_API_TOKEN`) wins over the file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context as _;
use rand::Rng;

/// The fewest characters of a token accepted on an address other than loopback.
pub const MIN_PUBLIC_CHARS: usize = 16;
/// The fewest different characters in such a token (`aaaa…` or a run of spaces has one).
pub const MIN_DISTINCT_CHARS: usize = 8;

/// Why a token is too weak to guard a server that others can reach, if it is. A random token
/// of 16 hex digits (64 bits) passes; so does `openssl rand -hex 32` or what
/// [`load_or_create`] generates.
pub fn weakness(token: &str) -> Option<String> {
    let chars = token.chars().count();
    if chars < MIN_PUBLIC_CHARS {
        return Some(format!(
            "it has {chars} characters; at least {MIN_PUBLIC_CHARS} are needed"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("it holds spaces or control characters".into());
    }
    let distinct = token
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if distinct < MIN_DISTINCT_CHARS {
        return Some(format!(
            "it has only {distinct} different characters; at least {MIN_DISTINCT_CHARS} are needed"
        ));
    }
    None
}

/// Takes the token out of this process's environment, where any process of the same user
/// (a rank, for one) could read it in `/proc/<pid>/environ`: the bytes of the original
/// environment block (what the kernel shows there) are overwritten and the variable is
/// removed, and the process is marked not dumpable, so its `/proc` files belong to root.
/// Called once, by `serve`, before any thread or rank is started.
pub fn scrub_from_environment(name: &str) {
    let prefix = format!("{name}=");
    // SAFETY: single-threaded at this point (called before the runtime starts); `environ` is
    // a NUL-terminated array of NUL-terminated strings, written in place up to their NULs.
    unsafe {
        unsafe extern "C" {
            static mut environ: *mut *mut libc::c_char;
        }
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = *p;
            let bytes = std::ffi::CStr::from_ptr(entry).to_bytes();
            if bytes.starts_with(prefix.as_bytes()) {
                let value = entry.add(prefix.len());
                std::ptr::write_bytes(value, 0, bytes.len() - prefix.len());
            }
            p = p.add(1);
        }
        std::env::remove_var(name);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Where the token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Read from the file (a previous start wrote it, or an operator or a Secret did).
    Read,
    /// Generated now and written to the file.
    Generated,
}

/// The token in `path`, or a new one written there (mode 0600, created exclusively, fsynced).
pub fn load_or_create(path: &Path) -> anyhow::Result<(String, Source)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            anyhow::ensure!(
                !token.is_empty(),
                "API token file {} is empty: put a token in it or delete it to have one generated",
                path.display()
            );
            return Ok((token.to_string(), Source::Read));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading API token file {}", path.display()));
        }
    }
    let bytes: [u8; 32] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    match write() {
        Ok(()) => Ok((token, Source::Generated)),
        // Another process made it between our read and our create: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e).with_context(|| format!("writing API token file {}", path.display()))
        }
    }
}

/// What the log shows: the token itself only the time it is generated.
pub fn announce(path: &Path, token: &str, source: &Source) -> String {
    match source {
        Source::Generated => format!(
            "trainvisor: generated an API token, saved in {} (mode 0600); it is shown only \
             this once. Clients send it as `Authorization: Bearer <token>`:\n\n    \
             TRAINVISOR_API_TOKEN={token}\n",
            path.display()
        ),
        Source::Read => format!(
            "trainvisor: API token read from {} (in a container: docker exec <container> cat {})",
            path.display(),
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_then_read_back_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        let (token, source) = load_or_create(&path).unwrap();
        assert_eq!(source, Source::Generated);
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(announce(&path, &token, &source).contains(&token));
        let (again, source) = load_or_create(&path).unwrap();
        assert_eq!((again.as_str(), &source), (token.as_str(), &Source::Read));
        assert!(!announce(&path, &again, &source).contains(&token));
    }

    #[test]
    fn an_empty_file_is_an_error_not_an_empty_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        std::fs::write(&path, "\n").unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}

#[cfg(test)]
mod strength_tests {
    use super::weakness;

    #[test]
    fn weak_tokens_are_named() {
        for (token, weak) in [
            ("x", true),
            ("            ", true),
            ("aaaaaaaaaaaaaaaa", true),
            ("abababababababababab", true),
            ("twelve chars", true),
            ("has a space in the middle of it", true),
            ("0123456789abcdef", false),
            ("docker-launcher-test-token", false),
            ("5f0c1a9e8b7d6c5f4e3d2c1b0a9f8e7d", false),
        ] {
            assert_eq!(weakness(token).is_some(), weak, "{token:?}");
        }
    }
}
