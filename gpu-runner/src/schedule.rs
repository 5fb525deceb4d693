//! Flow-matching sigma schedules: pure arithmetic, no tensors.
//!
//! A schedule is `steps + 1` noise levels going from (close to) 1 down to exactly 0; step `i`
//! moves the latent from `sigmas[i]` to `sigmas[i + 1]`.

use serde::{Deserialize, Serialize};

/// How a package declares its noise levels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", untagged)]
pub enum SigmaSchedule {
    /// The exact noise levels, `steps + 1` of them, strictly decreasing, ending at 0.
    Explicit { sigmas: Vec<f64> },
    /// Wan/SD3 time shift over `linspace(1, 0, steps + 1)`:
    /// `sigma' = shift * s / (1 + (shift - 1) * s)`.
    Shift { shift: f64 },
}

/// Why a schedule cannot be used for a number of steps.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("`sigmas` has {got} values but {steps} steps need {expected} (steps + 1)")]
    WrongLength {
        got: usize,
        steps: u32,
        expected: usize,
    },
    #[error(
        "`sigmas` must decrease strictly from at most 1 to exactly 0; value {index} ({value}) breaks that"
    )]
    NotDecreasing { index: usize, value: f64 },
    #[error("`shift` must be a finite number > 0, got {0}")]
    BadShift(f64),
    #[error("`steps` must be at least 1")]
    NoSteps,
}

impl SigmaSchedule {
    /// The `steps + 1` noise levels for `steps` denoising steps.
    pub fn sigmas(&self, steps: u32) -> Result<Vec<f64>, ScheduleError> {
        if steps == 0 {
            return Err(ScheduleError::NoSteps);
        }
        let sigmas = match self {
            SigmaSchedule::Explicit { sigmas } => {
                let expected = steps as usize + 1;
                if sigmas.len() != expected {
                    return Err(ScheduleError::WrongLength {
                        got: sigmas.len(),
                        steps,
                        expected,
                    });
                }
                sigmas.clone()
            }
            SigmaSchedule::Shift { shift } => shifted_linspace(*shift, steps)?,
        };
        validate(&sigmas)?;
        Ok(sigmas)
    }
}

fn shifted_linspace(shift: f64, steps: u32) -> Result<Vec<f64>, ScheduleError> {
    if !shift.is_finite() || shift <= 0.0 {
        return Err(ScheduleError::BadShift(shift));
    }
    Ok((0..=steps)
        .map(|i| {
            let s = 1.0 - f64::from(i) / f64::from(steps);
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect())
}

fn validate(sigmas: &[f64]) -> Result<(), ScheduleError> {
    let last = sigmas.len() - 1;
    for (index, &value) in sigmas.iter().enumerate() {
        let ok = value.is_finite()
            && value <= 1.0
            && if index == last {
                value == 0.0
            } else {
                value > sigmas[index + 1]
            };
        if !ok {
            return Err(ScheduleError::NotDecreasing { index, value });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_one_is_plain_linspace() {
        let s = SigmaSchedule::Shift { shift: 1.0 }.sigmas(4).unwrap();
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn shift_pushes_sigmas_up_and_keeps_ends() {
        let s = SigmaSchedule::Shift { shift: 5.0 }.sigmas(8).unwrap();
        assert_eq!(s.len(), 9);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[8], 0.0);
        // 5 * 0.5 / (1 + 4 * 0.5)
        assert!((s[4] - 2.5 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn explicit_must_match_steps_and_end_at_zero() {
        let sched = SigmaSchedule::Explicit {
            sigmas: vec![1.0, 0.9, 0.5, 0.0],
        };
        assert_eq!(sched.sigmas(3).unwrap().len(), 4);
        assert_eq!(
            sched.sigmas(4),
            Err(ScheduleError::WrongLength {
                got: 4,
                steps: 4,
                expected: 5
            })
        );
        let bad = SigmaSchedule::Explicit {
            sigmas: vec![1.0, 0.5, 0.6, 0.0],
        };
        assert!(matches!(
            bad.sigmas(3),
            Err(ScheduleError::NotDecreasing { index: 1, .. })
        ));
        let no_zero = SigmaSchedule::Explicit {
            sigmas: vec![1.0, 0.5, 0.1],
        };
        assert!(matches!(
            no_zero.sigmas(2),
            Err(ScheduleError::NotDecreasing { index: 2, .. })
        ));
    }

    #[test]
    fn manifest_json_forms() {
        let a: SigmaSchedule = serde_json::from_str(r#"{"shift": 3.0}"#).unwrap();
        assert_eq!(a, SigmaSchedule::Shift { shift: 3.0 });
        let b: SigmaSchedule = serde_json::from_str(r#"{"sigmas": [1.0, 0.0]}"#).unwrap();
        assert_eq!(
            b,
            SigmaSchedule::Explicit {
                sigmas: vec![1.0, 0.0]
            }
        );
    }
}
