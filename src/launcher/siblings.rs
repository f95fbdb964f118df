//! Copies of a data dir. `cp -a` carries the data dir's id along, so the instance that marks a
//! server's ranks (`TRAINVISOR_INSTANCE`) is that id keyed to the id file's inode, which no copy
//! keeps: a server on a copy neither sweeps the original's ranks nor is swept by it. And a job
//! whose ranks a live sibling (same id, other key) is running is not run a second time.

use std::collections::BTreeMap;
use std::path::Path;

use uuid::Uuid;

/// The instance of a data dir: its id, keyed to the inode of the file that holds it.
pub fn instance(id: &str, id_file: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(id_file) {
        Ok(m) => format!("{id}.{:x}", m.ino()),
        Err(_) => id.to_string(),
    }
}

/// Jobs whose ranks run on this host under a sibling instance (same data dir id, another
/// key): a copy of this data dir, or the original of this copy, with its server alive (its
/// ranks die with it). Each with one of those pids, to name it.
pub fn jobs_of_siblings(instance: &str) -> BTreeMap<Uuid, u32> {
    let Some((id, _)) = instance.split_once('.') else {
        return BTreeMap::new();
    };
    let family = format!("TRAINVISOR_INSTANCE={id}.");
    let mine = format!("TRAINVISOR_INSTANCE={instance}");
    let mut jobs = BTreeMap::new();
    for (pid, environ) in super::process::environments() {
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        let sibling = vars
            .iter()
            .any(|v| v.starts_with(family.as_bytes()) && *v != mine.as_bytes());
        if !sibling {
            continue;
        }
        let job = vars.iter().find_map(|v| {
            let rest = v.strip_prefix(b"JOB_ID")?.strip_prefix(b"=")?;
            std::str::from_utf8(rest).ok()?.parse::<Uuid>().ok()
        });
        if let Some(job) = job {
            jobs.entry(job).or_insert(pid);
        }
    }
    jobs
}
