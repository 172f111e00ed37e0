//! Field rules shared by request bodies (used through `validator`'s
//! `custom` attribute): printable text of bounded length.

use std::borrow::Cow;

use validator::ValidationError;

/// Longest name, in characters.
pub const NAME_CHARS_MAX: usize = 100;
/// Longest title, in characters.
pub const TITLE_CHARS_MAX: usize = 200;
/// Longest description or feedback, in characters.
pub const TEXT_CHARS_MAX: usize = 10_000;
/// Longest submission body, in characters.
pub const BODY_CHARS_MAX: usize = 50_000;

fn err(msg: String) -> ValidationError {
    let mut e = ValidationError::new("invalid");
    e.message = Some(Cow::Owned(msg));
    e
}

fn line(s: &str, max: usize) -> Result<(), ValidationError> {
    if s.trim().is_empty() {
        return Err(err("must not be blank".into()));
    }
    if s.chars().count() > max {
        return Err(err(format!("must have at most {max} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(err("must not contain control characters".into()));
    }
    Ok(())
}

fn text(s: &str, max: usize) -> Result<(), ValidationError> {
    if s.chars().count() > max {
        return Err(err(format!("must have at most {max} characters")));
    }
    if s.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(err(
            "must not contain control characters other than line breaks and tabs".into(),
        ));
    }
    Ok(())
}

/// A person's name: 1–100 printable characters.
pub fn name(s: &str) -> Result<(), ValidationError> {
    line(s, NAME_CHARS_MAX)
}

/// A title: 1–200 printable characters.
pub fn title(s: &str) -> Result<(), ValidationError> {
    line(s, TITLE_CHARS_MAX)
}

/// A description or feedback: up to 10,000 characters.
pub fn long_text(s: &str) -> Result<(), ValidationError> {
    text(s, TEXT_CHARS_MAX)
}

/// A submission body: 1–50,000 characters.
pub fn body(s: &str) -> Result<(), ValidationError> {
    if s.trim().is_empty() {
        return Err(err("must not be blank".into()));
    }
    text(s, BODY_CHARS_MAX)
}

/// A password: 8–128 characters (NIST SP 800-63B lengths).
pub fn password(s: &str) -> Result<(), ValidationError> {
    let n = s.chars().count();
    if !(8..=128).contains(&n) {
        return Err(err("must have 8 to 128 characters".into()));
    }
    Ok(())
}

/// A score: a finite number that is not negative.
pub fn score(v: f64) -> Result<(), ValidationError> {
    if !v.is_finite() || v < 0.0 {
        return Err(err("must be a number of at least 0".into()));
    }
    Ok(())
}
