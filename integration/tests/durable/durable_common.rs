//! What the durable-job tests of both storages share: a server whose responses carry a
//! job and a streamed body the test releases.
#![allow(dead_code)] // each test file uses its own share of these helpers

use apalis::prelude::TaskId;
use http::Response;
use tower_background::{BackgroundLayer, Task};

use crate::common::*;

/// Serves responses of `status`, with a streamed body released by the test, carrying what
/// `attach` makes (it may write to the storage first: a staged job); sends each job's id
/// to the returned probe, and each body's sender to the returned slot.
pub async fn serve_jobs<F, Fut>(
    layer: BackgroundLayer,
    status: http::StatusCode,
    attach: F,
) -> (std::net::SocketAddr, Probe<TaskId>, Handoff<Chunks>)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (TaskId, Task)> + Send + 'static,
{
    let ids = Probe::new();
    let chunks = Handoff::new();
    let (i, c) = (ids.clone(), chunks.clone());
    let svc = layered(layer, move |_req| {
        let (ids, chunks, attach) = (i.clone(), c.clone(), attach.clone());
        async move {
            let (id, task) = attach().await;
            ids.send(id);
            let (tx, body) = channel_body();
            chunks.put(tx);
            let mut res = Response::new(body);
            *res.status_mut() = status;
            res.extensions_mut().insert(task);
            res
        }
    });
    (serve_service(svc).await, ids, chunks)
}

/// The URL of the PostgreSQL test server (`TOWER_BACKGROUND_POSTGRES`), or `None` when none
/// was given and none is required (`TOWER_BACKGROUND_REQUIRE_POSTGRES=1`, as in CI, makes
/// a missing server a failure).
pub fn postgres_url() -> Option<String> {
    let Ok(url) = std::env::var("TOWER_BACKGROUND_POSTGRES") else {
        if std::env::var("TOWER_BACKGROUND_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("TOWER_BACKGROUND_POSTGRES is not set: run `.ci/postgres.sh`");
        }
        eprintln!(
            "skipped: no PostgreSQL server (export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh))"
        );
        return None;
    };
    Some(url)
}
