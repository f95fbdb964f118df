//! The worker environment, written once: every variable trainvisor sets for a rank and what
//! it means. The environment of each incarnation is built from this table, the names a job's
//! `env` may not set are this table's names, and the README's contract table is checked
//! against it.

use uuid::Uuid;

use crate::spec::JobSpec;

pub mod names;

pub use names::{
    EnvVar, SIGNALS_TO_HANDLE, WARM_START, WORKER_ENV, all_names, is_reserved, reserved_names,
};

/// Where a rank sits among its peers, as its launcher placed it: torchrun's node is a group
/// of `local_world_size` ranks that share a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub local_rank: u32,
    pub local_world_size: u32,
    pub group_rank: u32,
    pub group_world_size: u32,
}

impl Placement {
    /// Rank `rank` of `world_size` when ranks fill groups of `per_group` in order (ranks
    /// r / per_group share a group); a group larger than the job is the whole job.
    pub fn in_groups_of(rank: u32, world_size: u32, per_group: u32) -> Self {
        let local_world_size = per_group.min(world_size).max(1);
        Placement {
            local_rank: rank % local_world_size,
            local_world_size,
            group_rank: rank / local_world_size,
            group_world_size: world_size.div_ceil(local_world_size),
        }
    }
}

/// What one incarnation's environment is made of.
pub struct RankEnv<'a> {
    pub job_id: Uuid,
    pub spec: &'a JobSpec,
    pub rank: u32,
    pub placement: Placement,
    pub attempt: u32,
    pub token: &'a str,
    pub master_addr: &'a str,
    pub master_port: u16,
    /// The server as the rank reaches it.
    pub server_url: &'a str,
    pub instance: &'a str,
    pub cache_dir: &'a str,
    /// Where this incarnation may write its error file (`TORCHELASTIC_ERROR_FILE`).
    pub error_file: &'a str,
    /// The server's object-storage settings, by name (`S3_*`).
    pub s3: &'a [(String, String)],
    /// For ranks on this host: where their Python stacks go, the directory of the hook that
    /// registers them, and the `PYTHONPATH` the rank would have had without it.
    pub stacks: Option<StacksEnv<'a>>,
    /// The step count at the last `torch.save` the automatic heartbeats reported.
    pub resume_step: Option<u64>,
}

/// The part of the environment that lets trainvisor take a local Python rank's stacks.
pub struct StacksEnv<'a> {
    pub file: &'a str,
    pub hooks_dir: &'a str,
    pub inherited_pythonpath: Option<&'a str>,
}

impl RankEnv<'_> {
    /// The job's own `env`, then every variable of the table that has a value for this rank.
    pub fn build(&self) -> Vec<(String, String)> {
        let spec = self.spec;
        let uses_s3 = [&spec.dataset, &spec.checkpoint_dir]
            .iter()
            .any(|l| crate::storage::S3Url::is_s3(l));
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .filter(|(k, _)| {
                self.stacks.is_none() || !WORKER_ENV.iter().any(|v| v.prepends && v.name == *k)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for var in WORKER_ENV {
            if (var.s3_only && !uses_s3)
                || var.warm_only
                || (var.default_only && spec.env.contains_key(var.name))
            {
                continue;
            }
            if let Some(value) = self.value(var.name) {
                env.push((var.name.to_string(), value));
            }
        }
        env
    }

    fn value(&self, name: &str) -> Option<String> {
        let spec = self.spec;
        let place = self.placement;
        Some(match name {
            "RANK" => self.rank.to_string(),
            "WORLD_SIZE" => spec.world_size.to_string(),
            "LOCAL_RANK" => place.local_rank.to_string(),
            "LOCAL_WORLD_SIZE" => place.local_world_size.to_string(),
            "MASTER_ADDR" => self.master_addr.to_string(),
            "MASTER_PORT" => self.master_port.to_string(),
            "JOB_ID" => self.job_id.to_string(),
            "RESTART_COUNT" | "TORCHELASTIC_RESTART_COUNT" => self.attempt.to_string(),
            "GROUP_RANK" => place.group_rank.to_string(),
            "GROUP_WORLD_SIZE" => place.group_world_size.to_string(),
            "ROLE_NAME" => "default".to_string(),
            "ROLE_RANK" => self.rank.to_string(),
            "ROLE_WORLD_SIZE" => spec.world_size.to_string(),
            "TORCHELASTIC_RUN_ID" => self.job_id.to_string(),
            "TORCHELASTIC_MAX_RESTARTS" => spec.max_restarts.to_string(),
            "TORCHELASTIC_ERROR_FILE" => self.error_file.to_string(),
            "TORCHELASTIC_SIGNALS_TO_HANDLE" => SIGNALS_TO_HANDLE.to_string(),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING" | "OMP_NUM_THREADS" => "1".to_string(),
            "CHECKPOINT_DIR" => spec.job_checkpoint_dir(&self.job_id),
            "DATASET_DIR" => spec.dataset.clone(),
            "CHECKPOINT_EVERY" => spec.checkpoint_every.to_string(),
            "SLEEP_SEC" => spec.sleep_sec.to_string(),
            "HEARTBEAT_TIMEOUT" => spec.heartbeat_timeout_s.to_string(),
            "TRAINVISOR_HEARTBEAT_URL" => format!(
                "{}/jobs/{}/workers/{}/heartbeat",
                self.server_url, self.job_id, self.rank
            ),
            "TRAINVISOR_SERVER_URL" => self.server_url.to_string(),
            "TRAINVISOR_TOKEN" => self.token.to_string(),
            "TRAINVISOR_INSTANCE" => self.instance.to_string(),
            "TRAINVISOR_SPEC" => serde_json::to_string(spec).unwrap_or_default(),
            "TRAINVISOR_CACHE_DIR" => self.cache_dir.to_string(),
            "TRAINVISOR_STACKS_FILE" => self.stacks.as_ref()?.file.to_string(),
            "TRAINVISOR_AUTO_HEARTBEAT" => {
                self.stacks.as_ref()?;
                spec.auto_heartbeat.then(|| "1".to_string())?
            }
            "TRAINVISOR_RESUME_STEP" => {
                self.stacks.as_ref()?;
                spec.auto_heartbeat
                    .then_some(self.resume_step?)?
                    .to_string()
            }
            "PYTHONPATH" => {
                let s = self.stacks.as_ref()?;
                let before = spec
                    .env
                    .get("PYTHONPATH")
                    .map(String::as_str)
                    .or(s.inherited_pythonpath)
                    .filter(|p| !p.is_empty());
                match before {
                    Some(p) => format!("{}:{p}", s.hooks_dir),
                    None => s.hooks_dir.to_string(),
                }
            }
            s3_name => {
                return self
                    .s3
                    .iter()
                    .find(|(k, _)| k == s3_name)
                    .map(|(_, v)| v.clone());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JobDefaults;
    use crate::spec::JobRequest;

    fn spec(dataset: &str) -> JobSpec {
        JobRequest {
            world_size: Some(2),
            dataset: Some(dataset.into()),
            ..Default::default()
        }
        .resolve(&JobDefaults::for_data_dir(std::path::Path::new("/d")))
        .unwrap()
    }

    /// Rank 1's environment, its node holding `per_node` ranks.
    fn env_in(spec: &JobSpec, s3: &[(String, String)], per_node: u32) -> Vec<(String, String)> {
        RankEnv {
            job_id: Uuid::nil(),
            spec,
            rank: 1,
            placement: Placement::in_groups_of(1, spec.world_size, per_node),
            attempt: 3,
            token: "t",
            master_addr: "127.0.0.1",
            master_port: 29500,
            server_url: "http://s",
            instance: "i",
            cache_dir: "/c",
            error_file: "/e/error.json",
            s3,
            stacks: Some(StacksEnv {
                file: "/e/rank.stacks",
                hooks_dir: "/h",
                inherited_pythonpath: Some("/server/lib"),
            }),
            resume_step: Some(40),
        }
        .build()
    }

    fn env_of(spec: &JobSpec, s3: &[(String, String)]) -> Vec<(String, String)> {
        env_in(spec, s3, spec.world_size)
    }

    #[test]
    fn every_name_of_the_table_gets_a_value() {
        let s3: Vec<(String, String)> = WORKER_ENV
            .iter()
            .filter(|v| v.s3_only)
            .map(|v| (v.name.to_string(), "x".to_string()))
            .collect();
        let env = env_of(&spec("s3://bucket/data"), &s3);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let table: Vec<&str> = WORKER_ENV
            .iter()
            .filter(|v| !v.warm_only)
            .map(|v| v.name)
            .collect();
        assert_eq!(names, table, "the environment is the table, in order");
        assert_eq!(get_of(&env, "GROUP_RANK"), "0");
        assert_eq!(get_of(&env, "ROLE_NAME"), "default");
        assert_eq!(get_of(&env, "OMP_NUM_THREADS"), "1");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("RESTART_COUNT"), "3");
        assert_eq!(
            get("TRAINVISOR_HEARTBEAT_URL"),
            format!("http://s/jobs/{}/workers/1/heartbeat", Uuid::nil())
        );
        assert_eq!(get("TRAINVISOR_AUTO_HEARTBEAT"), "1");
        assert_eq!(get("TRAINVISOR_RESUME_STEP"), "40");
        // `"auto_heartbeat": false`: neither reaches the rank, so the hook stays idle.
        let mut quiet = spec("/data");
        quiet.auto_heartbeat = false;
        let env = env_of(&quiet, &[]);
        assert!(!env.iter().any(|(k, _)| k.starts_with("TRAINVISOR_AUTO")));
        assert!(!env.iter().any(|(k, _)| k == "TRAINVISOR_RESUME_STEP"));
        // Without a bucket, no S3 variable reaches the rank.
        let local = env_of(&spec("/data"), &s3);
        assert!(!local.iter().any(|(k, _)| k.starts_with("S3_")));
    }

    fn get_of(env: &[(String, String)], k: &str) -> String {
        env.iter().find(|(n, _)| n == k).unwrap().1.clone()
    }

    #[test]
    fn torchruns_defaults_yield_to_the_jobs_env_and_nodes_are_groups() {
        let mut spec = spec("/data");
        spec.env.insert("OMP_NUM_THREADS".into(), "8".into());
        spec.world_size = 8;
        let env = env_in(&spec, &[], 4);
        assert_eq!(
            env.iter().filter(|(k, _)| k == "OMP_NUM_THREADS").count(),
            1,
            "the job's value, once"
        );
        assert_eq!(get_of(&env, "OMP_NUM_THREADS"), "8");
        // PYTHONPATH: the stacks hook first, then the rank's own (the job's beats the server's).
        assert_eq!(get_of(&env, "PYTHONPATH"), "/h:/server/lib");
        spec.env.insert("PYTHONPATH".into(), "/mine".into());
        let env = env_in(&spec, &[], 4);
        assert_eq!(
            env.iter().filter(|(k, _)| k == "PYTHONPATH").count(),
            1,
            "composed once"
        );
        assert_eq!(get_of(&env, "PYTHONPATH"), "/h:/mine");
        assert!(!is_reserved("PYTHONPATH"));
        assert!(!is_reserved("OMP_NUM_THREADS"));
        assert!(is_reserved("GROUP_RANK"));
        // Rank 1 of 8, 4 per node: node 0 of 2.
        assert_eq!(get_of(&env, "GROUP_RANK"), "0");
        assert_eq!(get_of(&env, "GROUP_WORLD_SIZE"), "2");
        assert_eq!(get_of(&env, "LOCAL_WORLD_SIZE"), "4");
        assert_eq!(get_of(&env, "LOCAL_RANK"), "1");
        // A node holding more ranks than the job: one group of the whole job.
        let whole = Placement::in_groups_of(5, 6, 8);
        assert_eq!((whole.local_world_size, whole.group_world_size), (6, 1));
        assert_eq!((whole.local_rank, whole.group_rank), (5, 0));
    }

    #[test]
    fn the_readme_contract_table_names_every_variable_and_no_other() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("## What a rank's process gets")
            .expect("the README's worker-contract section");
        let section = &readme[start..];
        let table: Vec<&str> = section
            .lines()
            .skip_while(|l| !l.starts_with("| variable"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        let mut documented: Vec<String> = table
            .iter()
            .filter_map(|row| row.split('|').nth(1))
            .flat_map(|cell| {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        documented.sort();
        let mut names: Vec<String> = all_names().iter().map(|s| s.to_string()).collect();
        names.sort();
        assert_eq!(
            documented, names,
            "README worker-contract table vs WORKER_ENV"
        );
    }
}
