//! `/api/v1/notifications`: the caller's notifications, newest last.

use axum::extract::State;
use axum::http::{HeaderMap, Uri};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{AppResult, Problem};
use crate::extract::AppQuery;
use crate::keys;
use crate::model::Notification;
use crate::pagination::{PageQuery, Paged};
use crate::routes::session_or_prefix;

/// The caller's notifications.
#[utoipa::path(get, path = "/api/v1/notifications", tag = "users", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = [Notification]), (status = 401, body = Problem)))]
pub async fn list_notifications(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    AppQuery(q): AppQuery<PageQuery>,
) -> AppResult<Paged<Notification>> {
    // CONSISTENT_PREFIX (or SESSION with a token): notifications are written
    // by background jobs; a moment's lag costs nothing.
    let (rows, next) = st
        .db
        .page::<Notification>(
            &keys::notifications(caller.id()),
            &q,
            session_or_prefix(&headers)?,
            |_| true,
        )
        .await?;
    Ok(Paged {
        items: rows.into_iter().map(|r| r.value).collect(),
        path: uri.path().to_string(),
        per_page: q.per_page()?,
        next,
    })
}
