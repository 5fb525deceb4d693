//! What an API server error means. Every caller that treats a conflict or a missing object as
//! an expected outcome asks here instead of matching status codes itself.

/// The object changed since it was read (HTTP 409 on a write with a resourceVersion, or a
/// create of a name that exists).
pub fn is_conflict(error: &kube::Error) -> bool {
    status_code(error) == Some(409)
}

/// The object does not exist (HTTP 404).
pub fn is_not_found(error: &kube::Error) -> bool {
    status_code(error) == Some(404)
}

/// Why the API server refused the object itself, when it did: forbidden (403, for example by
/// a ResourceQuota) or invalid (422).
pub fn refusal(error: &kube::Error) -> Option<&str> {
    match error {
        kube::Error::Api(status) if matches!(status.code, 403 | 422) => Some(&status.message),
        _ => None,
    }
}

/// The API server did not answer, or answered that it cannot serve now (5xx: starting,
/// overloaded, timed out): says nothing about the object, only that the API server was not
/// reachable.
pub fn is_unreachable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// `Ok(None)` for a missing object, so a delete or patch of something already gone succeeds.
pub fn ignore_not_found<T>(result: Result<T, kube::Error>) -> Result<Option<T>, kube::Error> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
