//! Reconcile errors; each variant is a label of `framelane_reconcile_errors_total`.

use framelane_contract::api_errors::{is_conflict, is_unreachable};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object changed while it was being updated; it is reconciled again")]
    Conflict,
    #[error("the API server refused a request: {0}")]
    Kube(#[source] kube::Error),
}

impl Error {
    /// The metric label of the error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Conflict => "conflict",
            Error::Kube(_) => "kube_api",
        }
    }

    /// The API server could not be reached (or could not serve): see
    /// [`is_unreachable`].
    pub fn api_unreachable(&self) -> bool {
        matches!(self, Error::Kube(e) if is_unreachable(e))
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        if is_conflict(&e) {
            Error::Conflict
        } else {
            Error::Kube(e)
        }
    }
}
