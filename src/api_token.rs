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
