//! The warm-standby part of a job spec: `warm_standby` and `preload`. A job with it keeps,
//! beside each running rank, a Python process that has already imported `preload`, and a
//! rank that must be replaced becomes that process instead of a cold start.

use serde::{Deserialize, Serialize};

use super::LauncherKind;
use super::check::{SpecError, invalid};
use crate::domain::python_command::{PythonCommand, is_module_name};

/// What `preload` is when a job asks for warm standby without naming modules: torch, and
/// `torch._dynamo`, which DDP and the optimizers import on first use (measured: 1.2 s of a
/// restarted rank's first step on 2 cores, 2.5 s with four ranks at once).
pub const DEFAULT_PRELOAD: &[&str] = &["torch", "torch._dynamo"];

/// At most this many preload modules.
const MAX_PRELOAD: usize = 32;

/// The warm-standby options of a job, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandbySpec {
    /// Modules every standby imports before it says it is ready.
    pub preload: Vec<String>,
}

pub(super) fn resolve_standby(
    warm_standby: Option<bool>,
    preload: Option<Vec<String>>,
    command: Option<&[String]>,
    launcher: LauncherKind,
) -> Result<Option<StandbySpec>, SpecError> {
    if warm_standby != Some(true) {
        if preload.is_some() {
            return Err(invalid(
                "preload is a warm-standby option: it needs \"warm_standby\": true",
            ));
        }
        return Ok(None);
    }
    if !launcher.supports_warm_standby() {
        let able: Vec<_> = crate::launcher::kind::ALL
            .iter()
            .filter(|k| k.supports_warm_standby())
            .map(|k| k.as_str())
            .collect();
        return Err(invalid(format!(
            "warm_standby works with the {} launchers, not {}",
            able.join(" and "),
            launcher.as_str()
        )));
    }
    let Some(command) = command else {
        return Err(invalid(
            "warm_standby needs a Python command (python script.py … or python -m module …); \
             the built-in trainer starts in milliseconds without it",
        ));
    };
    if let Err(why) = PythonCommand::parse(command) {
        return Err(invalid(format!(
            "warm_standby needs a Python command (python script.py … or python -m module …): {why}"
        )));
    }
    let preload =
        preload.unwrap_or_else(|| DEFAULT_PRELOAD.iter().map(|m| m.to_string()).collect());
    if preload.len() > MAX_PRELOAD {
        return Err(invalid(format!(
            "preload may name at most {MAX_PRELOAD} modules"
        )));
    }
    for module in &preload {
        if !is_module_name(module) {
            return Err(invalid(format!(
                "preload: {module:?} is not a module name (such as torch or numpy.linalg)"
            )));
        }
    }
    Ok(Some(StandbySpec { preload }))
}
