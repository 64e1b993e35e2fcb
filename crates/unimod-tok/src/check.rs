//! Range checks of config values, shared by every section's `validate`: the error names the
//! field, the value and the accepted range, and NaN is never in range.

use std::fmt::Display;

/// A config value outside its accepted range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value} is not accepted: {accepted}")]
pub struct InvalidValue {
    /// The field's dotted name (`train.lr`).
    pub field: String,
    /// The value given.
    pub value: String,
    /// The accepted range, in words.
    pub accepted: String,
}

impl InvalidValue {
    /// The error for `field = value`, outside `accepted`.
    pub fn new(field: &str, value: impl Display, accepted: impl Display) -> InvalidValue {
        InvalidValue {
            field: field.into(),
            value: value.to_string(),
            accepted: accepted.to_string(),
        }
    }
}

/// `lo ≤ v ≤ hi` for a count or size.
pub fn int_in(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), InvalidValue> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(InvalidValue::new(
            field,
            v,
            format!("an integer in [{lo}, {hi}]"),
        ))
    }
}

/// `lo ≤ v ≤ hi` for a real number; NaN and infinities are refused unless `hi` is infinite.
pub fn float_in(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), InvalidValue> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        let hi = if hi.is_infinite() {
            "∞)".to_string()
        } else {
            format!("{hi}]")
        };
        Err(InvalidValue::new(
            field,
            v,
            format!("a number in [{lo}, {hi}"),
        ))
    }
}

/// A real number strictly above `lo` and at most `hi`.
pub fn float_above(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), InvalidValue> {
    if v > lo && v <= hi {
        Ok(())
    } else {
        Err(InvalidValue::new(
            field,
            v,
            format!("a number in ({lo}, {hi}]"),
        ))
    }
}

/// A name that is one plain path component (letters, digits, `-`, `_`, `.`; not `.` or `..`),
/// so a run named by it stays inside its parent directory.
pub fn plain_name(field: &str, v: &str) -> Result<(), InvalidValue> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(InvalidValue::new(
            field,
            format!("{v:?}"),
            "1–128 letters, digits, '-', '_' or '.' (not \".\" or \"..\"): it names a directory",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_nan_and_name_the_field() {
        assert!(float_in("train.lr", f64::NAN, 0.0, 1.0).is_err());
        assert!(float_in("x", f64::INFINITY, 0.0, f64::INFINITY).is_ok());
        assert!(float_above("x", 0.0, 0.0, 1.0).is_err());
        let e = int_in("data.train_pool", 0, 1, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data.train_pool = 0 is not accepted: an integer in [1, 10]"
        );
        for bad in ["", ".", "..", "../escape", "a/b", "a b"] {
            assert!(plain_name("experiment.name", bad).is_err(), "{bad}");
        }
        assert!(plain_name("experiment.name", "quick-start_2.1").is_ok());
    }
}
