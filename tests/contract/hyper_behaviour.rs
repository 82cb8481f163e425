//! What hyper 1.x does with a response body, per case and protocol: the table in
//! `docs/semantics.md`. The layer's completion detection rests on it, so if hyper changes
//! its behaviour, this test fails and the docs (and maybe the detection) need a look.

use crate::common;

use common::*;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tower_background::BackgroundLayer;

type Case = (&'static str, Method, fn() -> Response<BoxedBody>);

fn cases() -> Vec<Case> {
    vec![
        ("Full body", Method::GET, || Response::new(full("hello"))),
        ("empty body", Method::GET, || Response::new(empty())),
        ("streamed, then end of stream", Method::GET, || {
            let (tx, body) = channel_body();
            tx.send(data("a")).unwrap();
            tx.send(data("b")).unwrap();
            Response::new(body)
        }),
        (
            "streamed, Content-Length reached, stream left open",
            Method::GET,
            || {
                let (tx, body) = channel_body();
                tx.send(data("hello")).unwrap();
                std::mem::forget(tx); // the stream stays open for good
                let mut res = Response::new(body);
                res.headers_mut()
                    .insert("content-length", "5".parse().unwrap());
                res
            },
        ),
        ("data then trailers, stream left open", Method::GET, || {
            let (tx, body) = channel_body();
            tx.send(data("hello")).unwrap();
            tx.send(Ok(Frame::trailers(http::HeaderMap::new())))
                .unwrap();
            std::mem::forget(tx); // the stream stays open for good
            Response::new(body)
        }),
        ("HEAD, Full body", Method::HEAD, || {
            Response::new(full("hello"))
        }),
        ("204, Full body", Method::GET, || {
            let mut res = Response::new(full("hello"));
            *res.status_mut() = StatusCode::NO_CONTENT;
            res
        }),
        ("304, Full body", Method::GET, || {
            let mut res = Response::new(full("hello"));
            *res.status_mut() = StatusCode::NOT_MODIFIED;
            res
        }),
    ]
}

/// What this test observed with hyper 1.x, and `docs/semantics.md` documents.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("Full body", AFTER_1, AFTER_1),
    ("empty body", UNPOLLED, UNPOLLED),
    (
        "streamed, then end of stream",
        "polled to None after 2 frame(s)",
        "polled to None after 2 frame(s)",
    ),
    (
        "streamed, Content-Length reached, stream left open",
        AFTER_1,
        "still polling after 1 frame(s): dropped as the client left",
    ),
    (
        "data then trailers, stream left open",
        "dropped after 2 frame(s), no end of stream",
        "dropped after 2 frame(s), no end of stream",
    ),
    ("HEAD, Full body", UNPOLLED, AFTER_1),
    ("204, Full body", UNPOLLED, AFTER_1),
    ("304, Full body", UNPOLLED, AFTER_1),
];
const UNPOLLED: &str = "dropped unpolled";
const AFTER_1: &str = "dropped after 1 frame(s), no end of stream";

#[tokio::test]
async fn hyper_consumes_bodies_as_documented() {
    let mut observed = Vec::new();
    for (name, method, make) in cases() {
        let mut row = (name, String::new(), String::new());
        for proto in BOTH {
            let report = Probe::new();
            let addr = {
                let report = report.clone();
                serve(BackgroundLayer::new(), move |_req| {
                    let res = make().map(|inner| common::observed(inner, report.clone()));
                    async move { res }
                })
                .await
            };
            {
                let client = client(proto);
                let req = request(method.clone(), addr, "/");
                if let Ok(res) = within(client.request(req)).await {
                    let mut body = res.into_body();
                    // Read what arrives; a stream left open never ends, so stop at a lull,
                    // then go away (dropping the client closes its connections).
                    while let Ok(Some(Ok(_))) = tokio::time::timeout(QUIET, body.frame()).await {}
                }
            }
            let seen = report.next().await;
            match proto {
                Proto::Http1 => row.1 = seen,
                Proto::Http2 => row.2 = seen,
            }
        }
        observed.push(row);
    }
    for (name, h1, h2) in &observed {
        println!("| {name} | {h1} | {h2} |");
    }
    let observed: Vec<(&str, &str, &str)> = observed
        .iter()
        .map(|(n, a, b)| (*n, a.as_str(), b.as_str()))
        .collect();
    assert_eq!(observed, EXPECTED);
}
