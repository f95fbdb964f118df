//! The job spec's unit tests and its property test.

use super::*;

mod unit {
    use super::*;

    fn defaults() -> JobDefaults {
        JobDefaults::for_data_dir(std::path::Path::new("/tmp/tv"))
    }

    #[test]
    fn world_size_is_required_and_bounded() {
        let d = defaults();
        assert!(JobRequest::default().resolve(&d).is_err());
        let req = |w| JobRequest {
            world_size: Some(w),
            ..Default::default()
        };
        assert!(req(0).resolve(&d).is_err());
        assert!(req(1025).resolve(&d).is_err());
        assert_eq!(req(4).resolve(&d).unwrap().world_size, 4);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let spec = JobRequest {
            world_size: Some(1),
            ..Default::default()
        }
        .resolve(&defaults())
        .unwrap();
        assert_eq!(spec.restart_policy().backoff_ms(1), 500);
        assert_eq!(spec.restart_policy().backoff_ms(2), 1000);
        assert_eq!(spec.restart_policy().backoff_ms(3), 2000);
        assert_eq!(spec.restart_policy().backoff_ms(30), 30_000);
    }

    /// Issue 29, point 8: warm-standby jobs start their backoff at 50 ms, not 500.
    #[test]
    fn a_warm_standby_job_backs_off_less_at_first() {
        let req = |warm: Option<bool>, backoff: Option<i64>| JobRequest {
            world_size: Some(2),
            command: Some(vec!["python".into(), "train.py".into()]),
            warm_standby: warm,
            backoff_initial_ms: backoff,
            ..Default::default()
        };
        let policy = |r: JobRequest| r.resolve(&defaults()).unwrap().restart_policy();
        let warm = policy(req(Some(true), None));
        assert_eq!((warm.backoff_ms(1), warm.backoff_ms(3)), (50, 200));
        assert_eq!(policy(req(None, None)).backoff_ms(1), 500);
        assert_eq!(
            policy(req(Some(true), Some(0))).backoff_ms(1),
            0,
            "a set value wins"
        );
    }

    #[test]
    fn scope_defaults_follow_the_workload() {
        let d = defaults();
        let trainer = JobRequest {
            world_size: Some(2),
            ..Default::default()
        };
        assert_eq!(
            trainer.resolve(&d).unwrap().restart_scope,
            RestartScope::Job
        );
        let shell = JobRequest {
            world_size: Some(2),
            command: Some(vec!["true".into()]),
            ..Default::default()
        };
        assert_eq!(
            shell.resolve(&d).unwrap().restart_scope,
            RestartScope::Worker
        );
    }

    #[test]
    fn the_server_default_launcher_applies_and_slurm_shapes_resolve() {
        let mut d = defaults();
        assert_eq!(
            JobRequest {
                world_size: Some(4),
                ..Default::default()
            }
            .resolve(&d)
            .unwrap()
            .launcher,
            LauncherKind::Local
        );
        d.launcher = LauncherKind::Slurm;
        let shape = |nodes, per| {
            let spec = JobRequest {
                world_size: Some(5),
                nodes,
                ntasks_per_node: per,
                ..Default::default()
            }
            .resolve(&d)
            .unwrap();
            assert_eq!(spec.launcher, LauncherKind::Slurm);
            let s = spec.slurm.unwrap();
            (s.nodes, s.ntasks_per_node)
        };
        assert_eq!(shape(None, None), (1, 5));
        assert_eq!(shape(Some(2), None), (2, 3));
        assert_eq!(shape(None, Some(2)), (3, 2));
        assert_eq!(shape(Some(5), Some(1)), (5, 1));
    }

    #[test]
    fn env_names_are_checked() {
        let d = defaults();
        for bad in ["1X", "A-B", "", "RANK"] {
            let req = JobRequest {
                world_size: Some(1),
                env: Some([(bad.to_string(), "v".to_string())].into()),
                ..Default::default()
            };
            assert!(req.resolve(&d).is_err(), "{bad} accepted");
        }
    }
}

/// Property test: any JSON object made of the spec's fields with values of any type either
/// resolves to a spec that keeps the invariants, or is refused with a message; never a panic.
mod properties {
    use super::*;
    use crate::fuzz::{SPEC_FIELDS, random_json};
    use crate::trainer::rng::SplitMix64;
    use serde_json::{Value, json};

    #[test]
    fn any_spec_resolves_with_invariants_or_is_refused() {
        let defaults = JobDefaults::for_data_dir(std::path::Path::new("/data"));
        let mut rng = SplitMix64::new(20261128);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut obj = serde_json::Map::new();
            for _ in 0..rng.below(8) {
                let field = SPEC_FIELDS[rng.below(SPEC_FIELDS.len() as u64) as usize];
                obj.insert(field.into(), random_json(&mut rng, 0, 2));
            }
            if rng.below(2) == 0 {
                obj.insert("world_size".into(), json!(1 + rng.below(8)));
            }
            let Ok(request) = serde_json::from_value::<JobRequest>(Value::Object(obj)) else {
                refused += 1;
                continue;
            };
            match request.resolve(&defaults) {
                Ok(spec) => {
                    accepted += 1;
                    assert!((1..=defaults.max_world_size).contains(&spec.world_size));
                    assert!(spec.backoff_max_ms >= spec.backoff_initial_ms);
                    assert!(spec.heartbeat_timeout_s.is_finite() && spec.heartbeat_timeout_s > 0.0);
                    assert!(
                        spec.checkpoint_every >= 1 && spec.keep_last >= 1 && spec.batch_size >= 1
                    );
                    assert!(
                        spec.command
                            .as_ref()
                            .is_none_or(|c| !c.is_empty() && !c[0].is_empty())
                    );
                    assert!(
                        spec.env.keys().all(
                            |k| valid_env_name(k) && !crate::domain::worker_env::is_reserved(k)
                        )
                    );
                    // What is stored reads back as the same spec.
                    let stored = serde_json::to_string(&spec).unwrap();
                    assert_eq!(serde_json::from_str::<JobSpec>(&stored).unwrap(), spec);
                    let _ = spec.restart_policy().backoff_ms(u32::MAX);
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.0.is_empty());
                }
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "accepted {accepted}, refused {refused}"
        );
    }
}
