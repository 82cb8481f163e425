//! Contract 1, "after the response": a task starts only once its response is complete,
//! however hyper learns that the body is done. Contract 2 is checked alongside: each task
//! runs exactly once.

use crate::common;

use bytes::Bytes;
use common::*;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tower_background::{BackgroundLayer, OnEarlyDrop, SkipReason, Task, TaskErrorKind};

/// The layer of these tests skips the tasks of responses dropped early, so that a task
/// runs only if the layer saw its response complete: with the default (run them anyway),
/// a missed completion would go unnoticed.
fn strict_layer() -> BackgroundLayer {
    BackgroundLayer::new().on_early_drop(OnEarlyDrop::Skip)
}

/// A response with `body` and one task that reports `name` when it runs.
fn with_task(
    probe: &Probe<&'static str>,
    name: &'static str,
    builder: http::response::Builder,
    body: BoxedBody,
) -> Response<BoxedBody> {
    let probe = probe.clone();
    let mut res = builder.body(body).unwrap();
    res.extensions_mut()
        .insert(Task::new(async move { probe.send(name) }));
    res
}

/// Serves one response made by `make`, requests it with `method`, reads it whole, and
/// checks that its task ran exactly once.
async fn assert_runs_once(
    proto: Proto,
    method: Method,
    make: fn(&Probe<&'static str>) -> Response<BoxedBody>,
) {
    let probe = Probe::new();
    let addr = {
        let probe = probe.clone();
        serve(strict_layer(), move |_req| {
            let res = make(&probe);
            async move { res }
        })
        .await
    };
    let res = within(client(proto).request(request(method.clone(), addr, "/")))
        .await
        .unwrap();
    let read = within(res.into_body().collect()).await;
    if proto == Proto::Http2 && method == Method::HEAD {
        // hyper's HTTP/2 server sends the DATA of a HEAD response, and hyper's client resets
        // the stream (PROTOCOL_ERROR): the response still counts as sent.
        assert!(
            read.is_err(),
            "HTTP/2 HEAD: hyper's behaviour changed, update the docs"
        );
    } else {
        read.unwrap();
    }
    assert_eq!(
        probe.next().await,
        "ran",
        "{proto:?} {method}: the task ran"
    );
    probe
        .assert_quiet(&format!("{proto:?} {method}: the task ran twice"))
        .await;
}

#[tokio::test]
async fn tasks_start_only_after_the_last_chunk_is_sent() {
    for proto in BOTH {
        let probe = Probe::new();
        let chunks = Handoff::new();
        let addr = {
            let (probe, chunks) = (probe.clone(), chunks.clone());
            serve(strict_layer(), move |_req| {
                let res = with_task(&probe, "ran", Response::builder(), chunks.take());
                async move { res }
            })
            .await
        };
        let (tx, body) = channel_body();
        chunks.put(body);
        let res = open(proto, addr, "/").await;
        let mut body = res.into_body();

        tx.send(data("first")).unwrap();
        let frame = within(body.frame()).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        probe
            .assert_quiet(&format!("{proto:?}: a task started before the last chunk"))
            .await;

        tx.send(data("last")).unwrap();
        drop(tx); // the body's end of stream
        let rest = within(body.collect()).await.unwrap().to_bytes();
        assert_eq!(rest, "last");
        assert_eq!(
            probe.next().await,
            "ran",
            "{proto:?}: the task ran after the last chunk"
        );
        probe
            .assert_quiet(&format!("{proto:?}: the task ran twice"))
            .await;
    }
}

#[tokio::test]
async fn full_body_runs_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            with_task(
                probe,
                "ran",
                Response::builder(),
                full(r#"{"message":"Created"}"#),
            )
        })
        .await;
    }
}

#[tokio::test]
async fn empty_body_runs_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            with_task(probe, "ran", Response::builder(), empty())
        })
        .await;
    }
}

#[tokio::test]
async fn head_request_runs_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::HEAD, |probe| {
            with_task(
                probe,
                "ran",
                Response::builder(),
                full("a body HEAD may not carry"),
            )
        })
        .await;
    }
}

#[tokio::test]
async fn no_content_204_runs_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            let builder = Response::builder().status(StatusCode::NO_CONTENT);
            with_task(probe, "ran", builder, full("a body 204 may not carry"))
        })
        .await;
    }
}

#[tokio::test]
async fn not_modified_304_runs_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            let builder = Response::builder().status(StatusCode::NOT_MODIFIED);
            with_task(probe, "ran", builder, full("a body 304 may not carry"))
        })
        .await;
    }
}

#[tokio::test]
async fn trailers_run_its_tasks_once() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            let (tx, body) = channel_body();
            tx.send(data("payload")).unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", "abc".parse().unwrap());
            tx.send(Ok(Frame::trailers(trailers))).unwrap();
            // The sender stays open (leaked into the task) so the body never returns
            // `None`: only the trailers frame tells that it is complete.
            let probe = probe.clone();
            let mut res = Response::new(body);
            res.extensions_mut().insert(Task::new(async move {
                let _keep_open = tx;
                probe.send("ran")
            }));
            res
        })
        .await;
    }
}

/// A streamed body with a hand-set `Content-Length`: hyper's HTTP/1 stops polling once
/// that many bytes are written and drops the body without seeing its end.
/// HTTP/1.1: hyper stops polling once the declared `Content-Length` has been written, so
/// the byte count alone says the body is complete. HTTP/2: hyper keeps polling, and the
/// response is complete only when the stream ends after exactly the declared length.
#[tokio::test]
async fn content_length_reached_runs_its_tasks_once() {
    for proto in BOTH {
        let probe = Probe::new();
        let chunks = Handoff::new();
        let addr = {
            let (probe, chunks) = (probe.clone(), chunks.clone());
            serve(strict_layer(), move |_req| {
                let builder = Response::builder().header("content-length", "10");
                let res = with_task(&probe, "ran", builder, chunks.take());
                async move { res }
            })
            .await
        };
        let (tx, body) = channel_body();
        chunks.put(body);
        let res = open(proto, addr, "/").await;
        let mut body = res.into_body();
        tx.send(data("hello")).unwrap();
        tx.send(data("world")).unwrap();
        // The stream is left open: over HTTP/1.1 only the byte count says the body is
        // complete.
        let mut received = Vec::new();
        while received.len() < 10 {
            let frame = within(body.frame()).await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                received.extend_from_slice(&data);
            }
        }
        assert_eq!(received, b"helloworld");
        if proto == Proto::Http2 {
            probe
                .assert_quiet("HTTP/2: the task ran before the stream ended")
                .await;
        }
        drop(tx);
        assert_eq!(probe.next().await, "ran", "{proto:?}: the task ran");
        probe
            .assert_quiet(&format!("{proto:?}: the task ran twice"))
            .await;
    }
}

#[tokio::test]
async fn response_without_tasks_passes_through_unchanged() {
    for proto in BOTH {
        let addr = serve(BackgroundLayer::new(), |_req| async {
            Response::builder()
                .status(StatusCode::ACCEPTED)
                .header("x-kept", "yes")
                .body(full("untouched"))
                .unwrap()
        })
        .await;
        let res = open(proto, addr, "/").await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()["x-kept"], "yes");
        let body = within(res.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"untouched"));
    }
}

#[tokio::test]
async fn an_exact_size_hint_without_content_length_completes_the_response() {
    for proto in BOTH {
        assert_runs_once(proto, Method::GET, |probe| {
            // Sized, never at its end before its last poll, and no header.
            let body = hinted(full("sized, no header"), 16);
            with_task(probe, "ran", Response::builder(), body)
        })
        .await;
        // http-body-util's own: a `Full` body with trailers keeps `is_end_stream` false.
        assert_runs_once(proto, Method::GET, |probe| {
            let body = http_body_util::Full::new(Bytes::from_static(b"with trailers"))
                .with_trailers(async { None })
                .map_err(|never| match never {});
            with_task(probe, "ran", Response::builder(), body.boxed_unsync())
        })
        .await;
    }
}

/// Sends a raw HTTP/1.1 CONNECT and returns the status line the server answered with.
async fn raw_connect(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut line = String::new();
    within(BufReader::new(&mut stream).read_line(&mut line))
        .await
        .unwrap();
    line
}

/// hyper treats a 2xx answer to CONNECT as the start of a tunnel: it sends the head and
/// drops the body unpolled, however much it holds (review case 8).
#[tokio::test]
async fn a_2xx_answer_to_connect_is_complete_without_its_body() {
    let probe = Probe::new();
    let addr = {
        let probe = probe.clone();
        serve(strict_layer(), move |_req| {
            let res = with_task(&probe, "ran", Response::builder(), full("not sent"));
            async move { res }
        })
        .await
    };
    let status = raw_connect(addr).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(probe.next().await, "ran");
    probe.assert_quiet("the task ran twice").await;
}

/// A response that hyper (or any conforming client) refuses is never complete: with the
/// skip setting, its task is reported as skipped, never run (review case 9). What the client
/// sees differs by protocol (hyper aborts the HTTP/1.1 message; the HTTP/2 client resets the
/// stream); `tests/contract/hyper_oracle.rs` checks that side.
async fn assert_refused(
    proto: Proto,
    make: impl Fn() -> Response<BoxedBody> + Clone + Send + Sync + 'static,
    what: &str,
) {
    let (layer, errors) = reporting_layer();
    let background = layer.handle();
    let probe = Probe::<&str>::new();
    let addr = {
        let probe = probe.clone();
        serve(layer.on_early_drop(OnEarlyDrop::Skip), move |_req| {
            let probe = probe.clone();
            let mut res = make();
            res.extensions_mut()
                .insert(Task::new(async move { probe.send("ran") }));
            async move { res }
        })
        .await
    };
    let client = client(proto);
    if let Ok(res) = within(client.request(request(Method::GET, addr, "/"))).await {
        let _ = within(res.into_body().collect()).await;
    }
    drop(client);
    let report = errors.next().await;
    assert!(
        matches!(report.kind(), TaskErrorKind::Skipped(SkipReason::EarlyDrop)),
        "{proto:?}, {what}: {report}"
    );
    probe.assert_quiet(what).await;
    let stats = background.stats();
    assert_eq!(stats.attached, stats.settled(), "{stats}");
}

/// A streamed body of `data` whose head declares `content-length` as `values`.
fn declared(values: &'static [&'static str], data_: &'static str) -> Response<BoxedBody> {
    let (tx, body) = channel_body();
    tx.send(data(data_)).unwrap();
    drop(tx);
    let mut builder = Response::builder();
    for value in values {
        builder = builder.header("content-length", *value);
    }
    builder.body(body).unwrap()
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_not_complete() {
    for proto in BOTH {
        assert_refused(proto, || declared(&["10"], "short"), "5 bytes of 10").await;
    }
}

#[tokio::test]
async fn a_malformed_content_length_is_not_complete() {
    let cases: [&'static [&'static str]; 4] = [&["+10"], &["10, 10"], &["ten"], &["10", "11"]];
    for values in cases {
        for proto in BOTH {
            let what = format!("content-length {values:?}");
            assert_refused(proto, move || declared(values, "0123456789"), &what).await;
        }
    }
}

/// Attack review: over HTTP/1.1, `Transfer-Encoding: chunked` makes hyper send the body
/// chunked whatever its size hint says, so the hint's length is not the end: the end of
/// the stream is.
#[tokio::test]
async fn transfer_encoding_chunked_frames_the_body_to_its_end() {
    let probe = Probe::new();
    let chunks = Handoff::new();
    let addr = {
        let (probe, chunks) = (probe.clone(), chunks.clone());
        serve(strict_layer(), move |_req| {
            let builder = Response::builder().header("transfer-encoding", "chunked");
            let body = hinted(chunks.take(), 5);
            let res = with_task(&probe, "ran", builder, body);
            async move { res }
        })
        .await
    };
    let (tx, body) = channel_body();
    chunks.put(body);
    let res = within(client(Proto::Http1).request(request(Method::GET, addr, "/")))
        .await
        .unwrap();
    let mut body = res.into_body();
    tx.send(data("hello")).unwrap();
    within(body.frame()).await.unwrap().unwrap();
    probe
        .assert_quiet("the task ran at the hint's length, before the last chunk")
        .await;
    tx.send(data(", world")).unwrap();
    drop(tx);
    while within(body.frame()).await.is_some() {}
    assert_eq!(probe.next().await, "ran");
}

/// Attack review: a `Content-Length` beside `Transfer-Encoding` makes hyper's HTTP/1
/// encoder cancel the response; so does either on a 2xx answer to CONNECT.
#[tokio::test]
async fn content_length_beside_transfer_encoding_is_not_complete() {
    for te_first in [true, false] {
        assert_refused(
            Proto::Http1,
            move || {
                let (tx, body) = channel_body();
                tx.send(data("hello")).unwrap();
                drop(tx);
                let mut builder = Response::builder();
                if te_first {
                    builder = builder.header("transfer-encoding", "chunked");
                }
                builder = builder.header("content-length", "5");
                if !te_first {
                    builder = builder.header("transfer-encoding", "chunked");
                }
                builder.body(body).unwrap()
            },
            "content-length and transfer-encoding",
        )
        .await;
    }
}

/// Second attack review: the framing of heads that hyper rewrites before it sends them.
/// A response the client receives whole is complete; one it refuses is not.
#[tokio::test]
async fn heads_hyper_rewrites_are_judged_as_sent() {
    // HTTP/2: hyper drops the headers that `Connection` names, a length among them, and
    // fills the length from the exact size hint.
    assert_runs_once(Proto::Http2, Method::GET, |probe| {
        let builder = Response::builder()
            .header("connection", "content-length")
            .header("content-length", "100");
        with_task(probe, "ran", builder, full("hello"))
    })
    .await;
    assert_runs_once(Proto::Http2, Method::GET, |probe| {
        let builder = Response::builder()
            .header("connection", "x-trace, Content-Length")
            .header("content-length", "abc");
        with_task(probe, "ran", builder, full("hello"))
    })
    .await;
    // HTTP/1.1 request, HTTP/1.0 response (a proxy passing one through): no chunked
    // encoding, so hyper skips `Transfer-Encoding` and frames by the length.
    assert_runs_once(Proto::Http1, Method::GET, |probe| {
        let builder = Response::builder()
            .version(http::Version::HTTP_10)
            .header("transfer-encoding", "chunked")
            .header("content-length", "5");
        with_task(probe, "ran", builder, full("hello"))
    })
    .await;
}

#[tokio::test]
async fn heads_the_http2_client_refuses_are_not_complete() {
    // h2 reads at most 19 digits, leading zeros included.
    assert_refused(
        Proto::Http2,
        || declared(&["00000000000000000005"], "hello"),
        "a 20-digit length",
    )
    .await;
    // A 1xx status is not a final one: the client fails the connection.
    assert_refused(
        Proto::Http2,
        || {
            let mut res = declared(&[], "hello");
            *res.status_mut() = StatusCode::from_u16(103).unwrap();
            res
        },
        "103 as a final status",
    )
    .await;
}

/// Third attack review: hyper's HTTP/1.1 encoder panics on a response version other than
/// HTTP/1.0, 1.1 or 2 (a proxy copying an HTTP/3 upstream's): the client gets no head, so
/// the response is not complete, even when it carries no body.
#[tokio::test]
async fn a_response_version_hyper_cannot_write_is_not_complete() {
    for version in [http::Version::HTTP_3, http::Version::HTTP_09] {
        assert_refused(
            Proto::Http1,
            move || {
                let mut res = Response::new(empty());
                *res.version_mut() = version;
                res
            },
            "an HTTP/3 response version over HTTP/1.1",
        )
        .await;
    }
}

/// Issue 18, case 2: a streamed body says "exact 6" the first time its size is asked and
/// "not exact" afterwards, then yields "abc", "def" and "ghi". hyper frames it by the
/// answer it got (chunked over HTTP/1.1, no length over HTTP/2) and sends all 9 bytes: the
/// task waits for "ghi", and runs once the body is sent in full. (The layer once counted to
/// 6 from its own earlier look, and started the task before "ghi" was handed over; over
/// HTTP/2 it took the 9 bytes for more than declared, and skipped the task.)
#[tokio::test]
async fn completion_follows_the_size_hint_hyper_was_given() {
    for proto in BOTH {
        let probe = Probe::new();
        let layer = strict_layer();
        let background = layer.handle();
        let bodies = Handoff::new();
        let addr = {
            let (probe, bodies) = (probe.clone(), bodies.clone());
            serve(layer, move |_req| {
                let (chunks, body) = fickle(true, false);
                chunks.send(data("abc")).unwrap();
                chunks.send(data("def")).unwrap();
                bodies.put(chunks);
                let res = with_task(&probe, "after ghi", Response::builder(), body);
                async move { res }
            })
            .await
        };
        let res = open(proto, addr, "/").await;
        let mut body = res.into_body();
        let mut received = Vec::new();
        while received.len() < 6 {
            let frame = within(body.frame()).await.expect("a frame").unwrap();
            received.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        assert_eq!(
            background.stats().waiting,
            1,
            "{proto:?}: the task was handed over before \"ghi\" was sent"
        );
        let chunks = bodies.take();
        chunks.send(data("ghi")).unwrap();
        drop(chunks);
        let rest = within(body.collect()).await.unwrap().to_bytes();
        received.extend_from_slice(&rest);
        assert_eq!(received, b"abcdefghi", "{proto:?}");
        assert_eq!(probe.next().await, "after ghi", "{proto:?}");
        probe.assert_quiet("the task ran once").await;
    }
}

/// Issue 18, case 2: an empty body says "not at its end" the first time it is asked and
/// "at its end" afterwards. hyper, told it is at its end, sends an empty 200 and drops the
/// body unpolled: the response is complete, and its task runs, even though the layer skips
/// the tasks of responses dropped early. (The layer once decided from its own earlier look,
/// and reported the task `Skipped(EarlyDrop)`.)
#[tokio::test]
async fn completion_follows_the_end_of_stream_hyper_was_given() {
    for proto in BOTH {
        let probe = Probe::new();
        let addr = {
            let probe = probe.clone();
            serve(strict_layer(), move |_req| {
                let (chunks, body) = fickle(false, true);
                drop(chunks); // polled, it would end at once
                let res = with_task(&probe, "ran", Response::builder(), body);
                async move { res }
            })
            .await
        };
        let (status, body) = within(get(proto, addr, "/")).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0), "{proto:?}");
        assert_eq!(probe.next().await, "ran", "{proto:?}");
    }
}
