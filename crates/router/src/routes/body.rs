//! The one reader of request bodies, for every route that reads one: `/v0`'s JSON bodies and `/v1`'s inference
//! requests. A body is read whole, within a size limit, under the body deadline (`--body-timeout-secs`, counted
//! from the end of the headers), and within the router's memory budget of bodies (`--max-body-memory-mb`): a body
//! whose declared length or whose bytes so far would pass the budget is refused with `503` and `Retry-After`, and
//! the bytes of a body read count against the budget until they are dropped. A refused body is still read to its
//! end (and dropped as it comes, holding no memory), within the same deadline, so that a client that sends its
//! whole body before it reads (most do) gets the `503` rather than a broken connection.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::rate_limit::bodies::BodyLease;
use crate::state::AppState;

/// A request body read whole; its bytes count against the memory budget until this is dropped.
pub struct HeldBody {
    pub bytes: Bytes,
    _lease: BodyLease,
}

/// The length a request declares, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Reads `body` whole: at most `limit` bytes, within the body deadline and the memory budget.
pub async fn read(state: &AppState, body: Body, declared: Option<u64>, limit: usize) -> Result<HeldBody, ApiError> {
    let too_large = || ApiError::PayloadTooLarge(format!("The body is larger than the limit of {limit} bytes."));
    let declared = match declared {
        Some(length) => Some(usize::try_from(length).ok().filter(|length| *length <= limit).ok_or_else(too_large)?),
        None => None,
    };
    let budget = &state.body_budget;
    let busy = || {
        ApiError::Overloaded(format!(
            "The router holds as many request bodies in memory as its budget allows ({} MiB, \
             --max-body-memory-mb); try again in a moment.",
            budget.total() / (1024 * 1024)
        ))
    };
    let deadline = state.settings.body_timeout;
    let timed_out = || {
        ApiError::RequestTimeout(format!(
            "The body did not arrive within {} s of the headers; send it whole, promptly.",
            deadline.as_secs_f64()
        ))
    };
    let mut body = body.into_data_stream();
    let Some(mut lease) = budget.take(declared.unwrap_or(0)) else {
        tokio::time::timeout(deadline, discard(&mut body, limit)).await.map_err(|_| timed_out())?;
        return Err(busy());
    };
    let read = async {
        // The common case, a body that arrives in one frame, is kept as it came: no copy.
        let mut first: Option<Bytes> = None;
        let mut rest: Option<Vec<u8>> = None;
        let mut total = 0usize;
        while let Some(data) = body.next().await {
            let data = data.map_err(|err| ApiError::InvalidRequest(format!("The body could not be read: {err}.")))?;
            total = total.saturating_add(data.len());
            if total > limit {
                return Err(too_large());
            }
            if !budget.grow(&mut lease, total) {
                drop((first.take(), rest.take()));
                discard(&mut body, limit.saturating_sub(total)).await;
                return Err(busy());
            }
            match (&mut first, &mut rest) {
                (None, None) => first = Some(data),
                (Some(head), None) => {
                    // Sized by the declared length when there is one: the body's memory is then one allocation.
                    let mut joined = Vec::with_capacity(declared.unwrap_or(0).max(total));
                    joined.extend_from_slice(head);
                    joined.extend_from_slice(&data);
                    first = None;
                    rest = Some(joined);
                }
                (_, Some(joined)) => joined.extend_from_slice(&data),
            }
        }
        Ok(rest.map(Bytes::from).or(first).unwrap_or_default())
    };
    let bytes = tokio::time::timeout(deadline, read).await.map_err(|_| timed_out())??;
    Ok(HeldBody { bytes, _lease: lease })
}

/// Reads and drops what is left of a body, at most `limit` more bytes.
async fn discard(body: &mut axum::body::BodyDataStream, limit: usize) {
    let mut left = limit;
    while let Some(Ok(data)) = body.next().await {
        left = left.saturating_sub(data.len());
        if left == 0 {
            return;
        }
    }
}
