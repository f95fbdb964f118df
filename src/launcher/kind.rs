//! The launcher kinds a spec may name (`"launcher"`), and what each kind can do: the one
//! place outside a launcher's own folder where its kind is spelled, so that the rest of the
//! server asks a capability ([`LauncherKind::supports_warm_standby`]) instead of comparing
//! kinds. A kind is one row of the table at the end of this file; its launcher is a folder
//! under `src/launcher/` and its arms in `launcher::for_job`, `admit` and `sweep`.

use serde::{Deserialize, Serialize};

/// The enum, its names and its capabilities, from one row per kind.
macro_rules! launcher_kinds {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $name:literal, warm_standby: $warm:literal, host_local_hooks: $hooks:literal;
    )+) => {
        /// Where a job's ranks run.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "lowercase")]
        pub enum LauncherKind {
            #[default]
            $($(#[doc = $doc])* $variant,)+
        }

        /// Every kind, in the order the docs list them.
        pub const ALL: &[LauncherKind] = &[$(LauncherKind::$variant),+];

        impl LauncherKind {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(LauncherKind::$variant => $name,)+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                ALL.iter().copied().find(|k| k.as_str() == s)
            }

            /// Whether its ranks can be replaced by warm standbys (`warm_standby`): a standby
            /// is a process this server (or its srun) keeps beside the rank, which a container
            /// is not.
            pub fn supports_warm_standby(self) -> bool {
                match self {
                    $(LauncherKind::$variant => $warm,)+
                }
            }

            /// Whether its ranks run on this host and get its host-local hooks (what its
            /// launcher's places say, `Place::host_local`): the Python hook's stacks and
            /// automatic heartbeats (containers of the local engine too: one kernel, the hook
            /// mounted into them). A summary without step data says how to get it accordingly.
            pub fn host_local_hooks(self) -> bool {
                match self {
                    $(LauncherKind::$variant => $hooks,)+
                }
            }
        }
    };
}

impl std::str::FromStr for LauncherKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LauncherKind::parse(s).ok_or_else(|| {
            let names: Vec<_> = ALL.iter().map(|k| k.as_str()).collect();
            format!("{s:?}: expected one of {}", names.join(", "))
        })
    }
}

// The first row is the default. Each name must be its variant in lowercase (serde's name).
launcher_kinds! {
    /// Child processes of the server, on this machine.
    Local = "local", warm_standby: true, host_local_hooks: true;
    /// Slurm job steps (`srun`) inside an allocation the job owns.
    Slurm = "slurm", warm_standby: true, host_local_hooks: false;
    /// Docker containers of the job's `image`, on a network of the job's own.
    /// (Its containers share this host's kernel; the hook is mounted into them.)
    Docker = "docker", warm_standby: false, host_local_hooks: true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_serdes_and_parse_back() {
        for kind in ALL {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str(), "serde's name is the table's");
            assert_eq!(LauncherKind::parse(kind.as_str()), Some(*kind));
        }
        assert_eq!(LauncherKind::default(), LauncherKind::Local);
        let refused = "kubernetes".parse::<LauncherKind>().unwrap_err();
        assert!(
            refused.ends_with("expected one of local, slurm, docker"),
            "{refused}"
        );
    }
}
