//! Reading files a rank controls (its error file, its stacks file, checkpoint files it wrote)
//! without trusting them: no symlink is followed below a trusted base directory, only a
//! regular file is read (never a FIFO, socket or device, so `open` cannot block and `read`
//! cannot run forever), and never more than a cap.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Opens `base/rel` for reading. `base` is the server's own directory and is trusted as it is;
/// every component of `rel` is opened with `O_NOFOLLOW`, the last also with `O_NONBLOCK` (a
/// FIFO opens at once instead of waiting for a writer) and must be a regular file.
pub fn open_beneath(base: &Path, rel: &Path) -> io::Result<File> {
    let mut dir = open_at(None, base.as_os_str().as_bytes(), dir_flags(false))?;
    let parts: Vec<&[u8]> = rel
        .components()
        .map(|c| match c {
            Component::Normal(p) => Ok(p.as_bytes()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only plain names below the base",
            )),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    };
    for name in dirs {
        dir = open_at(Some(&dir), name, dir_flags(true))?;
    }
    let fd = open_at(
        Some(&dir),
        last,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
    )?;
    let file = File::from(fd);
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Opens a rank-controlled `path` whose parent directory is trusted (the server made it).
pub fn open_file(path: &Path) -> io::Result<File> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
    };
    open_beneath(parent, Path::new(name))
}

/// At most `cap` bytes of a rank-controlled file, from `offset`.
pub fn read_capped(path: &Path, offset: u64, cap: usize) -> io::Result<Vec<u8>> {
    let mut f = open_file(path)?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))?;
    }
    let mut out = Vec::new();
    f.take(cap as u64).read_to_end(&mut out)?;
    Ok(out)
}

/// The length of a rank-controlled regular file (0 when it is missing or anything else).
pub fn len(path: &Path) -> u64 {
    open_file(path)
        .and_then(|f| f.metadata())
        .map(|m| m.len())
        .unwrap_or(0)
}

fn dir_flags(nofollow: bool) -> libc::c_int {
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    flags
}

fn open_at(dir: Option<&OwnedFd>, name: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid C string and flags; the returned descriptor is owned right away.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_read_capped_and_everything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/ok"), b"0123456789").unwrap();
        assert_eq!(read_capped(&d.join("sub/ok"), 2, 4).unwrap(), b"2345");
        assert_eq!(len(&d.join("sub/ok")), 10);
        assert_eq!(
            open_beneath(d, Path::new("sub/ok"))
                .unwrap()
                .metadata()
                .unwrap()
                .len(),
            10
        );

        // A symlink, as the file or as a directory on the way, is never followed.
        std::os::unix::fs::symlink("/dev/zero", d.join("sub/zero")).unwrap();
        std::os::unix::fs::symlink(d.join("sub"), d.join("link")).unwrap();
        assert!(read_capped(&d.join("sub/zero"), 0, 4).is_err());
        assert!(open_beneath(d, Path::new("link/ok")).is_err());
        assert!(open_beneath(d, Path::new("../etc/passwd")).is_err());

        // A FIFO opens at once (no writer needed) and is refused; so is a directory.
        let fifo = CString::new(d.join("sub/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(read_capped(&d.join("sub/fifo"), 0, 4).is_err());
        assert!(read_capped(&d.join("sub"), 0, 4).is_err());
        assert_eq!(len(&d.join("sub/fifo")), 0);
    }
}
