//! The lmskv error model: stable codes, the typed error both sides use, and the
//! one conversion table between it and `tonic::Status`.
//!
//! A node turns an [`Error`] into a status whose binary details hold the
//! encoded `lmskv.v1.Error`; a client decodes it back without loss, so routing
//! errors carry what heals a client's cache.

use prost::Message;

use crate::v1;

/// The stable code of an [`Error`], as carried on the wire.
pub type ErrorKind = v1::ErrorCode;

/// A node address hint: the leader's id and, when known, its gRPC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's node id.
    pub node_id: u64,
    /// The leader's `HOST:PORT`, empty when unknown.
    pub address: String,
}

/// Every error an lmskv node reports, with what the caller needs to act on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The replica asked is not the range's leader.
    #[error("not leader of range {range_id}{}", leader_suffix(.leader))]
    NotLeader {
        range_id: u64,
        leader: Option<LeaderHint>,
    },
    /// The request's range epoch is stale; `current` holds the descriptors now in force.
    #[error("epoch mismatch for range {range_id}")]
    EpochMismatch {
        range_id: u64,
        current: Vec<v1::RangeDescriptor>,
    },
    /// A key of the request lies outside the range; `current` is the range's descriptor.
    #[error("key not in range {range_id}")]
    KeyNotInRange {
        range_id: u64,
        current: Option<v1::RangeDescriptor>,
    },
    /// The node hosts no replica of the range.
    #[error("range {range_id} not found on this node")]
    RangeNotFound { range_id: u64 },
    /// The range or node cannot serve now (no quorum, shutting down, unreachable).
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// The request did not finish in time; a write may or may not have been applied.
    #[error("timed out: {reason}")]
    Timeout { reason: String },
    /// The node sheds load; retry after the given delay.
    #[error("overloaded, retry after {retry_after_ms} ms")]
    Overloaded { retry_after_ms: u64 },
    /// The request is malformed or exceeds a limit; nothing was written.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A compare-and-swap condition did not hold; `current` is the key's state.
    #[error("compare failed")]
    CasFailed { current: Option<v1::KeyValue> },
    /// Stored data failed its checksum; the range refuses to serve it.
    #[error("data corruption: {reason}")]
    Corruption { reason: String },
    /// An unexpected failure inside the node.
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

fn leader_suffix(leader: &Option<LeaderHint>) -> String {
    match leader {
        Some(h) if !h.address.is_empty() => {
            format!(", leader is node {} at {}", h.node_id, h.address)
        }
        Some(h) => format!(", leader is node {}", h.node_id),
        None => ", leader unknown".to_string(),
    }
}

impl Error {
    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid_argument(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Unavailable`].
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Error::Unavailable {
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Internal`].
    pub fn internal(reason: impl Into<String>) -> Self {
        Error::Internal {
            reason: reason.into(),
        }
    }

    /// The stable code of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotLeader { .. } => ErrorKind::NotLeader,
            Error::EpochMismatch { .. } => ErrorKind::EpochMismatch,
            Error::KeyNotInRange { .. } => ErrorKind::KeyNotInRange,
            Error::RangeNotFound { .. } => ErrorKind::RangeNotFound,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::CasFailed { .. } => ErrorKind::CasFailed,
            Error::Corruption { .. } => ErrorKind::Corruption,
            Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// Whether sending the same request again (possibly elsewhere) may succeed.
    /// Writes are only safe to resend because they carry a request id.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::EpochMismatch { .. }
                | Error::KeyNotInRange { .. }
                | Error::RangeNotFound { .. }
                | Error::Unavailable { .. }
                | Error::Timeout { .. }
                | Error::Overloaded { .. }
        )
    }

    /// The gRPC status code for this error: the one mapping table.
    pub fn grpc_code(&self) -> tonic::Code {
        match self.kind() {
            ErrorKind::NotLeader => tonic::Code::Unavailable,
            ErrorKind::EpochMismatch => tonic::Code::FailedPrecondition,
            ErrorKind::KeyNotInRange => tonic::Code::FailedPrecondition,
            ErrorKind::RangeNotFound => tonic::Code::NotFound,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Timeout => tonic::Code::DeadlineExceeded,
            ErrorKind::Overloaded => tonic::Code::ResourceExhausted,
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::CasFailed => tonic::Code::Aborted,
            ErrorKind::Corruption => tonic::Code::DataLoss,
            ErrorKind::Internal | ErrorKind::Unspecified => tonic::Code::Internal,
        }
    }

    /// Encodes this error as its wire message.
    pub fn to_proto(&self) -> v1::Error {
        let mut e = v1::Error {
            code: self.kind() as i32,
            message: self.to_string(),
            ..Default::default()
        };
        match self {
            Error::NotLeader { range_id, leader } => {
                e.range_id = *range_id;
                if let Some(h) = leader {
                    e.leader_id = h.node_id;
                    e.leader_addr = h.address.clone();
                }
            }
            Error::EpochMismatch { range_id, current } => {
                e.range_id = *range_id;
                e.ranges = current.clone();
            }
            Error::KeyNotInRange { range_id, current } => {
                e.range_id = *range_id;
                e.ranges = current.iter().cloned().collect();
            }
            Error::RangeNotFound { range_id } => e.range_id = *range_id,
            Error::Overloaded { retry_after_ms } => e.retry_after_ms = *retry_after_ms,
            Error::InvalidArgument { field, reason } => {
                e.field = field.clone();
                e.reason = reason.clone();
            }
            Error::CasFailed { current } => e.current = current.clone(),
            Error::Unavailable { reason }
            | Error::Timeout { reason }
            | Error::Corruption { reason }
            | Error::Internal { reason } => e.reason = reason.clone(),
        }
        e
    }

    /// Decodes a wire error.
    pub fn from_proto(e: v1::Error) -> Self {
        let code = ErrorKind::try_from(e.code).unwrap_or(ErrorKind::Unspecified);
        match code {
            ErrorKind::NotLeader => Error::NotLeader {
                range_id: e.range_id,
                leader: (e.leader_id != 0).then_some(LeaderHint {
                    node_id: e.leader_id,
                    address: e.leader_addr,
                }),
            },
            ErrorKind::EpochMismatch => Error::EpochMismatch {
                range_id: e.range_id,
                current: e.ranges,
            },
            ErrorKind::KeyNotInRange => Error::KeyNotInRange {
                range_id: e.range_id,
                current: e.ranges.into_iter().next(),
            },
            ErrorKind::RangeNotFound => Error::RangeNotFound {
                range_id: e.range_id,
            },
            ErrorKind::Unavailable => Error::Unavailable { reason: e.reason },
            ErrorKind::Timeout => Error::Timeout { reason: e.reason },
            ErrorKind::Overloaded => Error::Overloaded {
                retry_after_ms: e.retry_after_ms,
            },
            ErrorKind::InvalidArgument => Error::InvalidArgument {
                field: e.field,
                reason: e.reason,
            },
            ErrorKind::CasFailed => Error::CasFailed { current: e.current },
            ErrorKind::Corruption => Error::Corruption { reason: e.reason },
            ErrorKind::Internal | ErrorKind::Unspecified => Error::Internal {
                reason: if e.reason.is_empty() {
                    e.message
                } else {
                    e.reason
                },
            },
        }
    }

    /// Converts this error into a gRPC status carrying the encoded error in its details.
    pub fn into_status(self) -> tonic::Status {
        let details = self.to_proto().encode_to_vec();
        tonic::Status::with_details(self.grpc_code(), self.to_string(), details.into())
    }

    /// Recovers an error from a gRPC status: exactly when the status came from a
    /// node, by mapping the gRPC code when it came from the transport.
    pub fn from_status(status: &tonic::Status) -> Self {
        if !status.details().is_empty() {
            if let Ok(e) = v1::Error::decode(status.details()) {
                if e.code != ErrorKind::Unspecified as i32 {
                    return Error::from_proto(e);
                }
            }
        }
        let reason = status.message().to_string();
        match status.code() {
            tonic::Code::InvalidArgument => Error::InvalidArgument {
                field: String::new(),
                reason,
            },
            tonic::Code::DeadlineExceeded => Error::Timeout { reason },
            tonic::Code::ResourceExhausted => Error::Overloaded {
                retry_after_ms: 100,
            },
            tonic::Code::DataLoss => Error::Corruption { reason },
            // An internal error that does not come from a node's handler
            // (those carry the error in the details, above) is the
            // transport's: an HTTP/2 stream reset, a connection torn
            // down mid-answer. The call may have been applied; retryable,
            // and a write that gives up on it reports its outcome unknown.
            tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal => Error::Unavailable {
                reason: format!("{:?}: {reason}", status.code()),
            },
            _ => Error::Internal {
                reason: format!("{:?}: {reason}", status.code()),
            },
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: Error) {
        let status = e.clone().into_status();
        assert_eq!(status.code(), e.grpc_code());
        assert_eq!(Error::from_status(&status), e);
    }

    #[test]
    fn every_error_survives_the_wire() {
        round_trip(Error::NotLeader {
            range_id: 3,
            leader: Some(LeaderHint {
                node_id: 2,
                address: "127.0.0.1:7002".into(),
            }),
        });
        round_trip(Error::NotLeader {
            range_id: 3,
            leader: None,
        });
        round_trip(Error::EpochMismatch {
            range_id: 1,
            current: vec![v1::RangeDescriptor {
                range_id: 1,
                ..Default::default()
            }],
        });
        round_trip(Error::KeyNotInRange {
            range_id: 1,
            current: None,
        });
        round_trip(Error::RangeNotFound { range_id: 9 });
        round_trip(Error::unavailable("no quorum"));
        round_trip(Error::Timeout { reason: "x".into() });
        round_trip(Error::Overloaded { retry_after_ms: 50 });
        round_trip(Error::invalid_argument("key", "too long"));
        round_trip(Error::CasFailed {
            current: Some(v1::KeyValue {
                key: "k".into(),
                value: "v".into(),
                version: 4,
            }),
        });
        round_trip(Error::Corruption {
            reason: "crc".into(),
        });
        round_trip(Error::internal("boom"));
    }

    #[test]
    fn transport_statuses_map_to_retryable_errors() {
        let e = Error::from_status(&tonic::Status::unavailable("connection refused"));
        assert!(e.is_retryable());
        let e = Error::from_status(&tonic::Status::invalid_argument("bad"));
        assert!(!e.is_retryable());
        // A stream reset mid-answer: the call may have been applied.
        let e = Error::from_status(&tonic::Status::internal(
            "h2 protocol error: stream error received: unspecific protocol error detected",
        ));
        assert!(
            matches!(e, Error::Unavailable { .. }) && e.is_retryable(),
            "{e:?}"
        );
    }
}
