//! The launcher kinds a spec may name (`"launcher"`), and what each kind can do: the one
//! place outside a launcher's own folder where its kind is spelled, so that the rest of the
//! server asks a capability ([`LauncherKind::supports_warm_standby`]) instead of comparing
//! kinds. A new launcher is a folder under `src/launcher/` plus its arm here and in
//! `launcher::for_job`.

use serde::{Deserialize, Serialize};

/// Where a job's ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// Child processes of the server, on this machine.
    #[default]
    Local,
    /// Slurm job steps (`srun`) inside an allocation the job owns.
    Slurm,
    /// Docker containers of the job's `image`, on a network of the job's own.
    Docker,
}

impl LauncherKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LauncherKind::Local => "local",
            LauncherKind::Slurm => "slurm",
            LauncherKind::Docker => "docker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(LauncherKind::Local),
            "slurm" => Some(LauncherKind::Slurm),
            "docker" => Some(LauncherKind::Docker),
            _ => None,
        }
    }
}

/// Every kind, in the order the docs list them.
pub const ALL: [LauncherKind; 3] = [
    LauncherKind::Local,
    LauncherKind::Slurm,
    LauncherKind::Docker,
];

impl LauncherKind {
    /// Whether its ranks can be replaced by warm standbys (`warm_standby`): a standby is a
    /// process this server (or its srun) keeps beside the rank, which a container is not.
    pub fn supports_warm_standby(self) -> bool {
        match self {
            LauncherKind::Local | LauncherKind::Slurm => true,
            LauncherKind::Docker => false,
        }
    }
}

impl LauncherKind {
    /// Whether its ranks run on this host and get its host-local hooks (the launch's
    /// `Place::host_local`): the Python hook's stacks and automatic heartbeats. A summary
    /// without step data says how to get it accordingly.
    pub fn host_local_hooks(self) -> bool {
        match self {
            LauncherKind::Local => true,
            LauncherKind::Slurm | LauncherKind::Docker => false,
        }
    }
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
