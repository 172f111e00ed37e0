//! [`ClientError`]: what can go wrong in a client call, and whether retrying could help.

use lmskv_proto::error::Error as ServerError;

/// An error returned by a [`crate::Client`] call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// A node refused the request for a reason retrying cannot fix (invalid
    /// argument, compare failed, corruption), or retries ran out.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// The call's deadline passed; `last` is the last error seen. A write may
    /// or may not have been applied (retrying it with the same request id is safe).
    #[error("deadline of {deadline_ms} ms exceeded after {attempts} attempts; last error: {last}")]
    DeadlineExceeded {
        deadline_ms: u64,
        attempts: u32,
        last: Box<ClientError>,
    },
    /// No endpoint could be reached.
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The client was configured wrongly (no endpoints, a bad address).
    #[error("client configuration: {0}")]
    Config(String),
    /// The caller's input is invalid; nothing was sent.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
}

impl ClientError {
    /// Whether sending the request again could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server(e) => e.is_retryable(),
            ClientError::Unreachable { .. } | ClientError::DeadlineExceeded { .. } => true,
            ClientError::Config(_) | ClientError::InvalidArgument { .. } => false,
        }
    }

    /// The server's error, when this is one (looking through a deadline's last error).
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ClientError::Server(e) => Some(e),
            ClientError::DeadlineExceeded { last, .. } => last.server_error(),
            _ => None,
        }
    }

    /// Whether the outcome of a write is unknown (it may have been applied).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::DeadlineExceeded { .. }
                | ClientError::Server(ServerError::Timeout { .. })
                | ClientError::Server(ServerError::Unavailable { .. })
        )
    }
}
