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

    /// Whether the outcome of a write is unknown (it may have been applied,
    /// or may still be): the deadline passed, a try timed out or lost its
    /// connection, or a node failed inside (an `Internal` answer can come
    /// after the write was applied). A call whose earlier try may have been
    /// applied and whose last try was refused for a reason that does not
    /// settle that earlier try (it was refused before the range's state
    /// machine could answer for the request id, say) reports a
    /// [`ServerError::Timeout`] naming the last refusal, so this holds for it
    /// too. Only an answer the state machine gives for the request id (or a
    /// refusal of the request's content, which every try shares) settles the
    /// outcome after such a try.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::DeadlineExceeded { .. }
                | ClientError::Server(ServerError::Timeout { .. })
                | ClientError::Server(ServerError::Unavailable { .. })
                | ClientError::Server(ServerError::Internal { .. })
        )
    }

    /// Whether this definite error, from the last try of a write whose
    /// earlier try may have been applied, still tells that the write was
    /// not applied. Every try of a write carries the same request id, and
    /// the range's state machine answers a retry of an applied write from
    /// its dedup record: its answers for the id (a failed compare) are the
    /// write's. A refusal of the request's content (a key, a value, an
    /// operation) is one every try got alike, so none was applied. Other
    /// refusals are not: a late copy refused by its session's completed mark
    /// (`write.request_id`), anything about one try's envelope (`header.*`,
    /// `write.*`, a bundle's `requests`), an argument error without a field
    /// (from the transport, not a node), internal errors, and errors the
    /// client made itself after a try was sent.
    pub(crate) fn settles_earlier_tries(&self) -> bool {
        match self {
            ClientError::Server(ServerError::CasFailed { .. }) => true,
            ClientError::Server(ServerError::InvalidArgument { field, .. }) => {
                !field.is_empty()
                    && !["write", "header", "requests"].iter().any(|&envelope| {
                        field
                            .strip_prefix(envelope)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
                    })
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(field: &str) -> ClientError {
        ClientError::Server(ServerError::invalid_argument(field, "refused"))
    }

    #[test]
    fn only_answers_for_the_request_id_or_its_content_settle_earlier_tries() {
        for settled in [
            ClientError::Server(ServerError::CasFailed { current: None }),
            invalid("key"),
            invalid("value"),
            invalid("ops[3].key"),
            invalid("conditions"),
            invalid("writer"),
        ] {
            assert!(settled.settles_earlier_tries(), "{settled:?}");
        }
        for unsettled in [
            invalid("write.request_id"),
            invalid("write.completed_below"),
            invalid("header.suspect_leader"),
            invalid("requests"),
            invalid("requests[].request"),
            invalid(""),
            ClientError::Server(ServerError::internal("unexpected apply result")),
            ClientError::Server(ServerError::Corruption {
                reason: "crc".into(),
            }),
            ClientError::Config("bad address".into()),
            ClientError::InvalidArgument {
                field: "ops".into(),
                reason: "spans ranges".into(),
            },
        ] {
            assert!(!unsettled.settles_earlier_tries(), "{unsettled:?}");
        }
    }

    #[test]
    fn an_internal_answer_leaves_a_write_of_unknown_outcome() {
        assert!(ClientError::Server(ServerError::internal("boom")).is_outcome_unknown());
        assert!(!invalid("key").is_outcome_unknown());
        assert!(
            !ClientError::Server(ServerError::CasFailed { current: None }).is_outcome_unknown()
        );
    }
}
