//! [`ClientError`]: every error the client returns, one clear line each.

use proto::clientpb::{ClientError as WireError, ClientError_Code};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("no meta yet: run quiver create-meta")]
    NoMeta,
    #[error("not the leader: {0}")]
    NotLeader(String),
    #[error("gave up after {0} redirects")]
    TooManyRedirects(usize),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("wrong range: {0}")]
    WrongRange(String),
    #[error("cannot reach {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("timed out")]
    Timeout,
    #[error("outcome unknown (the write may or may not have applied): {0}")]
    UnknownOutcome(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The client-side error for a wire error.
    pub fn from_wire(e: &WireError) -> Self {
        let m = e.message.clone();
        match e.code {
            ClientError_Code::NO_META => ClientError::NoMeta,
            ClientError_Code::NOT_LEADER => ClientError::NotLeader(if e.leader_hint.is_empty() {
                "leader unknown".into()
            } else {
                format!("leader at {}", e.leader_hint)
            }),
            ClientError_Code::WRONG_RANGE => ClientError::WrongRange(m),
            ClientError_Code::UNAVAILABLE | ClientError_Code::INTERNAL => {
                ClientError::Unavailable(m)
            }
            ClientError_Code::INVALID_ARGUMENT => ClientError::InvalidArgument {
                field: if e.field.is_empty() {
                    "request".into()
                } else {
                    e.field.clone()
                },
                message: m,
            },
            ClientError_Code::TOO_LARGE => ClientError::TooLarge(m),
            ClientError_Code::CONFLICT => ClientError::Conflict(m),
            ClientError_Code::UNKNOWN_OUTCOME => ClientError::UnknownOutcome(m),
            ClientError_Code::NOT_FOUND => ClientError::NotFound(m),
        }
    }
}
