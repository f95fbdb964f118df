//! The spec's error and its small range checks, shared by the spec and by each launcher's own
//! spec fields (`launcher/<kind>/spec.rs`), which the spec in turn imports: a leaf module, so
//! neither imports the other.

/// Why a spec was refused; the message is shown to the client as is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

pub(crate) fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError(msg.into())
}

pub(crate) fn in_range(name: &str, value: i64, min: i64, max: i64) -> Result<i64, SpecError> {
    if value < min || value > max {
        // A bound no one could mean is not worth printing.
        return Err(invalid(if max == i64::MAX {
            format!("{name} must be at least {min}, got {value}")
        } else {
            format!("{name} must be between {min} and {max}, got {value}")
        }));
    }
    Ok(value)
}

pub(crate) fn finite_in(name: &str, value: f64, min: f64, max: f64) -> Result<f64, SpecError> {
    if !value.is_finite() || value < min || value > max {
        return Err(invalid(format!(
            "{name} must be a number between {min} and {max}, got {value}"
        )));
    }
    Ok(value)
}
