//! The events file the ranks of every runner append to, read incrementally: who entered
//! `init_process_group`, who stepped, and when.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde::Deserialize;

use super::WORLD;

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Event {
    pub(super) t: f64,
    pub(super) rank: i64,
    pub(super) pid: u32,
    pub(super) phase: String,
}

/// The events file, read incrementally.
pub(super) struct Events {
    path: PathBuf,
    offset: u64,
    partial: String,
    pub(super) all: Vec<Event>,
}

impl Events {
    pub(super) fn new(path: PathBuf) -> Self {
        Events {
            path,
            offset: 0,
            partial: String::new(),
            all: Vec::new(),
        }
    }

    pub(super) fn refresh(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = String::new();
        if let Ok(n) = f.read_to_string(&mut buf) {
            self.offset += n as u64;
            self.partial.push_str(&buf);
            while let Some(nl) = self.partial.find('\n') {
                let line: String = self.partial.drain(..=nl).collect();
                if let Ok(e) = serde_json::from_str::<Event>(&line) {
                    self.all.push(e);
                }
            }
        }
    }

    /// Each rank's first step after `since` by a process not in `old`, once all have one.
    pub(super) fn group_stepped(&self, since: f64, old: &HashSet<u32>) -> Option<f64> {
        let mut first: HashMap<i64, f64> = HashMap::new();
        for e in &self.all {
            if e.phase == "step" && e.t > since && !old.contains(&e.pid) {
                first.entry(e.rank).or_insert(e.t);
            }
        }
        (first.len() == WORLD).then(|| first.values().copied().fold(f64::MIN, f64::max))
    }

    pub(super) fn pids(&self) -> HashSet<u32> {
        self.all.iter().map(|e| e.pid).collect()
    }

    pub(super) fn rank_pid(&self, rank: i64) -> Option<u32> {
        self.all
            .iter()
            .rev()
            .find(|e| e.rank == rank && e.phase == "step")
            .map(|e| e.pid)
    }

    /// What the processes started after `since` did: how many there were, entered
    /// `init_process_group`, got a process group, stepped.
    pub(super) fn after(&self, since: f64, old: &HashSet<u32>) -> [usize; 4] {
        let new: Vec<&Event> = self
            .all
            .iter()
            .filter(|e| e.t > since && !old.contains(&e.pid))
            .collect();
        let count = |phase: Option<&str>| {
            new.iter()
                .filter(|e| phase.is_none_or(|p| e.phase == p))
                .map(|e| e.pid)
                .collect::<HashSet<u32>>()
                .len()
        };
        [
            count(None),
            count(Some("init")),
            count(Some("ready")),
            count(Some("step")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: f64, rank: i64, pid: u32, phase: &str) -> String {
        format!(
            "{{\"t\": {t}, \"rank\": {rank}, \"pid\": {pid}, \"phase\": \"{phase}\", \"step\": 1}}\n"
        )
    }

    #[test]
    fn events_time_the_restarted_group_by_new_pids_only() {
        let path = std::env::temp_dir().join(format!("tv-peer-events-{}", uuid::Uuid::new_v4()));
        let mut text = String::new();
        for r in 0..4 {
            text += &line(10.0 + r as f64, r, 100 + r as u32, "init");
            text += &line(20.0 + r as f64, r, 100 + r as u32, "step");
        }
        // Half a line: read once it is complete.
        let (done, _) = text.split_at(text.len() - 10);
        std::fs::write(&path, done).unwrap();
        let mut ev = Events::new(path.clone());
        ev.refresh();
        assert_eq!(ev.group_stepped(0.0, &HashSet::new()), None);
        std::fs::write(&path, text.clone()).unwrap();
        ev.refresh();
        assert_eq!(ev.group_stepped(0.0, &HashSet::new()), Some(23.0));
        assert_eq!(ev.rank_pid(1), Some(101));
        let old = ev.pids();
        // After the kill at t=30: old ranks still stepping do not count, nor 3 of 4 new ones.
        let mut more = line(31.0, 0, 100, "step");
        for r in 0..4 {
            more += &line(40.0, r, 200 + r as u32, "init");
        }
        for r in 0..3 {
            more += &line(50.0 + r as f64, r, 200 + r as u32, "step");
        }
        std::fs::write(&path, text.clone() + &more).unwrap();
        ev.refresh();
        assert_eq!(ev.group_stepped(30.0, &old), None);
        assert_eq!(ev.after(30.0, &old), [4, 4, 0, 3]);
        std::fs::write(&path, text + &more + &line(60.0, 3, 203, "step")).unwrap();
        ev.refresh();
        assert_eq!(ev.group_stepped(30.0, &old), Some(60.0));
        let _ = std::fs::remove_file(&path);
    }
}
