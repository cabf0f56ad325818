//! The server's errors and their one mapping to gRPC status codes.

use tonic::Status;

use crate::{grants::GrantError, store::StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The policy (or the set it would produce) does not compile: `file:line:col: message`
    /// lines.
    #[error("policy rejected:\n{0}")]
    Invalid(String),
    #[error("no policy named `{name}`")]
    NotFound { name: String },
    #[error("{0}")]
    BadRequest(String),
    /// `--policy-admin` is set and the caller is not one of them.
    #[error("`{user}` is not a policy admin (--policy-admin) and so may not change policies")]
    NotPolicyAdmin { user: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Grant(#[from] GrantError),
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Self {
        let msg = corral_runtime::error_chain(&e);
        match e {
            ServerError::Invalid(_) | ServerError::BadRequest(_) => Status::invalid_argument(msg),
            ServerError::NotFound { .. } => Status::not_found(msg),
            ServerError::NotPolicyAdmin { .. } => Status::permission_denied(msg),
            ServerError::Store(StoreError::Conflict { .. }) => Status::failed_precondition(msg),
            ServerError::Store(_) => Status::internal(msg),
            ServerError::Grant(g) => match g {
                GrantError::MissingReason
                | GrantError::Missing { .. }
                | GrantError::BadId { .. }
                | GrantError::TtlTooLong { .. } => Status::invalid_argument(msg),
                GrantError::NotFound { .. } | GrantError::UnknownTemplate { .. } => {
                    Status::not_found(msg)
                }
                GrantError::NotCovered { .. }
                | GrantError::UnknownSession { .. }
                | GrantError::WrongState { .. }
                | GrantError::NoLongerOffered { .. } => Status::failed_precondition(msg),
                GrantError::SelfApproval { .. }
                | GrantError::NotApprover { .. }
                | GrantError::NotApproverOrRequester { .. } => Status::permission_denied(msg),
                GrantError::Policy(_) | GrantError::Store(_) => Status::internal(msg),
            },
        }
    }
}
