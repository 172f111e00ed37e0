//! [`AppError`]: every way a request can fail, and its one mapping to an
//! RFC 9457 `application/problem+json` response.
//!
//! Handlers return `Result<_, AppError>`; the status, headers
//! (`WWW-Authenticate` on 401, `Retry-After` on 429 and 503) and body are
//! decided here and nowhere else. Errors from lmskv are logged here, where
//! they are handled, and reach the caller as a 503 without internal detail.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use lmskv_client::{ClientError, ServerError};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid input field.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FieldError {
    /// The field's name (dotted for nested fields).
    pub field: String,
    /// Why the value was refused.
    pub message: String,
}

/// An RFC 9457 problem details body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The invalid fields, for validation errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Malformed input (bad JSON, a bad path or query parameter).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed input that breaks a rule of its fields.
    #[error("invalid input")]
    Validation(Vec<FieldError>),
    /// No credentials, or credentials that are expired, tampered or unknown.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The object does not exist, or the caller may not know that it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with the current state (duplicate, full, already graded).
    #[error("{0}")]
    Conflict(String),
    /// An `If-Match` precondition failed: someone else changed the object first.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The body is larger than the configured limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body is not JSON.
    #[error("expected a JSON body (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// Too many requests; try again after the given time.
    #[error("rate limit exceeded")]
    TooManyRequests { retry_after: Duration },
    /// The request ran longer than the configured request timeout.
    #[error("the request took longer than {} ms; try again", .0.as_millis())]
    Timeout(Duration),
    /// lmskv did not answer in time or is unavailable.
    #[error("the database is unavailable")]
    Unavailable(#[source] ClientError),
    /// A contended key could not be updated in a bounded number of tries.
    #[error("{0}; try again")]
    Busy(String),
    /// A bug or corrupt stored data.
    #[error("internal error")]
    Internal(String),
    /// More records than one read may hold (a gradebook or export of a
    /// course beyond [`crate::db::PREFIX_READ_MAX`] records). Retrying does
    /// not help.
    #[error("{0}")]
    TooManyRecords(String),
}

impl AppError {
    /// A validation error on one field.
    pub fn field(field: &str, message: impl Into<String>) -> AppError {
        AppError::Validation(vec![FieldError {
            field: field.to_string(),
            message: message.into(),
        }])
    }

    fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Timeout(_) | AppError::Unavailable(_) | AppError::Busy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(_) | AppError::TooManyRecords(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            AppError::BadRequest(_) => "bad-request",
            AppError::Validation(_) => "validation",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not-found",
            AppError::Conflict(_) => "conflict",
            AppError::PreconditionFailed(_) => "precondition-failed",
            AppError::PayloadTooLarge(_) => "payload-too-large",
            AppError::UnsupportedMediaType => "unsupported-media-type",
            AppError::TooManyRequests { .. } => "rate-limited",
            AppError::Timeout(_) => "timeout",
            AppError::Unavailable(_) => "unavailable",
            AppError::Busy(_) => "busy",
            AppError::Internal(_) => "internal",
            AppError::TooManyRecords(_) => "too-many-records",
        }
    }
}

impl From<ClientError> for AppError {
    fn from(e: ClientError) -> Self {
        match e.server_error() {
            // Keys and values are built by this service, so a refused argument is a bug.
            Some(ServerError::InvalidArgument { .. }) => AppError::Internal(e.to_string()),
            _ if matches!(
                e,
                ClientError::InvalidArgument { .. } | ClientError::Config(_)
            ) =>
            {
                AppError::Internal(e.to_string())
            }
            _ => AppError::Unavailable(e),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            AppError::Unavailable(e) => tracing::warn!(error = %e, "lmskv unavailable"),
            AppError::Internal(e) => tracing::error!(error = %e, "internal error"),
            AppError::TooManyRecords(e) => tracing::error!(error = %e, "too many records"),
            _ => {}
        }
        let (detail, errors) = match &self {
            AppError::Validation(errs) => {
                ("one or more fields are invalid".to_string(), errs.clone())
            }
            other => (other.to_string(), Vec::new()),
        };
        let body = Problem {
            kind: format!("https://lms.example/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            AppError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="lms-api", error="invalid_token""#),
                );
            }
            AppError::TooManyRequests { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            AppError::Timeout(_) | AppError::Unavailable(_) | AppError::Busy(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        resp
    }
}

/// A `Result` whose error is an [`AppError`].
pub type AppResult<T> = Result<T, AppError>;
