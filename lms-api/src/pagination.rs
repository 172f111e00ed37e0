//! Cursor pagination over lmskv prefix scans, with RFC 8288 `Link` headers
//! as Canvas does: `?per_page=N&cursor=C`, `per_page` 10 by default and at
//! most 100, and `Link: <…&cursor=…>; rel="next"` while more items follow.
//!
//! A cursor is the base64url of the last returned key's suffix after the
//! list's prefix: opaque to callers, and unable to point outside the list.
//! Because a page resumes *after* a key, concurrent inserts never repeat or
//! skip items that existed for the whole walk.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::config::{PER_PAGE_DEFAULT, PER_PAGE_MAX};
use crate::error::{AppError, AppResult};

/// Longest cursor accepted, in characters.
pub const CURSOR_CHARS_MAX: usize = 128;

/// The paging parameters of a list request.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 10).
    #[param(minimum = 1, maximum = 100)]
    pub per_page: Option<u32>,
    /// Where to continue, from the previous page's `Link: rel="next"`.
    pub cursor: Option<String>,
}

/// A position in a list: the suffix of the last key returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    /// The cursor after `key` in the list under `prefix`.
    pub fn after(prefix: &[u8], key: &[u8]) -> Cursor {
        Cursor(key.strip_prefix(prefix).unwrap_or(key).to_vec())
    }

    /// The cursor's text form.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0)
    }
}

impl PageQuery {
    /// The page size, checked against its limits.
    pub fn per_page(&self) -> AppResult<u32> {
        match self.per_page {
            None => Ok(PER_PAGE_DEFAULT),
            Some(n) if (1..=PER_PAGE_MAX).contains(&n) => Ok(n),
            Some(_) => Err(AppError::field(
                "per_page",
                format!("must be between 1 and {PER_PAGE_MAX}"),
            )),
        }
    }

    /// The first key to scan for this page in the list under `prefix`.
    pub fn start_key(&self, prefix: &[u8]) -> AppResult<Bytes> {
        let Some(c) = &self.cursor else {
            return Ok(Bytes::copy_from_slice(prefix));
        };
        let bad = || AppError::field("cursor", "not a cursor returned by this API");
        if c.len() > CURSOR_CHARS_MAX {
            return Err(bad());
        }
        let suffix = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
        if suffix.is_empty() {
            return Err(bad());
        }
        let mut b = BytesMut::with_capacity(prefix.len() + suffix.len() + 1);
        b.put_slice(prefix);
        b.put_slice(&suffix);
        // The first key after the cursor's key.
        b.put_u8(0);
        Ok(b.freeze())
    }
}

/// A page of a list: a JSON array with a `Link` header.
#[derive(Debug)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// The request path the links point to.
    pub path: String,
    pub per_page: u32,
    pub next: Option<Cursor>,
}

impl<T: Serialize> IntoResponse for Paged<T> {
    fn into_response(self) -> Response {
        let first = format!("<{}?per_page={}>; rel=\"first\"", self.path, self.per_page);
        let link = match &self.next {
            Some(c) => format!(
                "<{}?per_page={}&cursor={}>; rel=\"next\", {first}",
                self.path,
                self.per_page,
                c.encode()
            ),
            None => first,
        };
        let mut resp = axum::Json(self.items).into_response();
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_resumes_after_its_key() {
        let prefix = b"user/";
        let key = b"user/\x00\x00\x00\x00\x00\x00\x00\x07";
        let q = PageQuery {
            per_page: None,
            cursor: Some(Cursor::after(prefix, key).encode()),
        };
        let start = q.start_key(prefix).unwrap();
        assert!(start[..] > key[..]);
        assert!(start.starts_with(prefix));
        assert!(start[..] < b"user/\x00\x00\x00\x00\x00\x00\x00\x08"[..]);
    }

    #[test]
    fn bad_cursor_and_per_page_are_refused() {
        let q = PageQuery {
            per_page: Some(101),
            cursor: Some("!!".into()),
        };
        assert!(q.per_page().is_err());
        assert!(q.start_key(b"x/").is_err());
        let q = PageQuery {
            per_page: Some(0),
            cursor: Some(String::new()),
        };
        assert!(q.per_page().is_err());
        assert!(q.start_key(b"x/").is_err());
    }
}
