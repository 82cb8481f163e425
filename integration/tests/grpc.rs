//! gRPC with tonic, a server and a client we did not write: `BackgroundLayer` in
//! `Server::builder().layer(..)`, tasks from the request's own `Tasks` (request-scoped,
//! as an interceptor or a handler adds them) and from a `tonic::Response`'s extensions,
//! and `Condition::grpc_ok()`, which tells a failed call from a good one although both
//! are HTTP 200: from the `grpc-status` in the head, or in the trailers after a stream.
//!
//! The service is written by hand over tonic's `Grpc` and tonic-prost's codec, with a
//! message derived by `prost` (no protoc).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use common::{PATIENCE, Probe, within};
use futures_util::stream::{self, Stream, StreamExt};
use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_background::{BackgroundLayer, Condition, SkipReason, Task, TaskErrorKind, Tasks};

/// The one message of the service: what the client asks for, and each answer.
#[derive(Clone, PartialEq, prost::Message)]
struct Say {
    #[prost(string, tag = "1")]
    text: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `test.Echo`: `Unary` answers `text`, or fails with NOT_FOUND when asked "fail";
/// `Stream` sends two messages, then ends well, fails ("fail"), or never ends ("hang").
/// Each call attaches a task that reports its text to `ran`.
#[derive(Clone)]
struct Echo {
    ran: Probe<String>,
}

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tower::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ran = self.ran.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<Say, Say>::default());
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary(ran), req).await,
                _ => grpc.server_streaming(Streaming(ran), req).await,
            })
        })
    }
}

struct Unary(Probe<String>);

impl UnaryService<Say> for Unary {
    type Response = Say;
    type Future = BoxFuture<Result<tonic::Response<Say>, Status>>;

    fn call(&mut self, request: tonic::Request<Say>) -> Self::Future {
        let ran = self.0.clone();
        Box::pin(async move {
            // The request's own tasks, as the layer gives them (`with_request_tasks`).
            let mut tasks = request.extensions().get::<Tasks>().cloned().unwrap();
            let text = request.into_inner().text;
            let said = text.clone();
            tasks.push(Task::new(async move { ran.send(said) }).named("after_unary"));
            match text.as_str() {
                "fail" => Err(Status::not_found("no such thing")),
                _ => Ok(tonic::Response::new(Say { text })),
            }
        })
    }
}

struct Streaming(Probe<String>);

type Messages = Pin<Box<dyn Stream<Item = Result<Say, Status>> + Send>>;

impl ServerStreamingService<Say> for Streaming {
    type Response = Say;
    type ResponseStream = Messages;
    type Future = BoxFuture<Result<tonic::Response<Messages>, Status>>;

    fn call(&mut self, request: tonic::Request<Say>) -> Self::Future {
        let ran = self.0.clone();
        Box::pin(async move {
            let text = request.into_inner().text;
            let two = stream::iter(["one", "two"].map(|text| {
                Ok(Say {
                    text: text.to_owned(),
                })
            }));
            let messages: Messages = match text.as_str() {
                "fail" => Box::pin(two.chain(stream::iter([Err(Status::internal("midway"))]))),
                "hang" => Box::pin(two.chain(stream::pending())),
                _ => Box::pin(two),
            };
            // Tasks in the response's extensions: they run once the stream has ended.
            let mut response = tonic::Response::new(messages);
            let said = text.clone();
            let task = Task::new(async move { ran.send(said) }).named("after_stream");
            response.extensions_mut().insert(task);
            Ok(response)
        })
    }
}

/// A tonic server with `layer` around the service, and a client on it.
async fn serve(
    layer: BackgroundLayer,
    ran: &Probe<String>,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let echo = Echo { ran: ran.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .serve_with_incoming(echo, incoming),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

fn say(text: &str) -> tonic::Request<Say> {
    tonic::Request::new(Say {
        text: text.to_owned(),
    })
}

async fn unary(client: &mut tonic::client::Grpc<tonic::transport::Channel>, text: &str) -> Code {
    within(client.ready()).await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Unary");
    match within(client.unary(say(text), path, ProstCodec::<Say, Say>::default())).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Reads a server stream to its end: its messages, and the status it ended with.
async fn streamed(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    text: &str,
) -> (usize, Code) {
    within(client.ready()).await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Stream");
    let codec = ProstCodec::<Say, Say>::default();
    let mut messages = within(client.server_streaming(say(text), path, codec))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    loop {
        match within(messages.message()).await {
            Ok(Some(_)) => n += 1,
            Ok(None) => return (n, Code::Ok),
            Err(status) => return (n, status.code()),
        }
    }
}

fn reporting() -> (BackgroundLayer, Probe<tower_background::TaskError>) {
    let errors = Probe::new();
    let tx = errors.sender();
    let layer = BackgroundLayer::new()
        .with_request_tasks()
        .run_if(Condition::grpc_ok())
        .on_error(move |err| {
            let _ = tx.send(err);
        });
    (layer, errors)
}

fn assert_not_met(report: &tower_background::TaskError, name: &str) {
    assert_eq!(report.name(), name);
    assert!(
        matches!(
            report.kind(),
            TaskErrorKind::Skipped(SkipReason::ConditionNotMet)
        ),
        "{report}"
    );
    assert!(report.is_expected());
}

/// A unary call: its request-scoped task runs once the call succeeded; a call that
/// failed (NOT_FOUND, an HTTP 200 with `grpc-status: 5`) runs none.
#[tokio::test]
async fn a_unary_calls_tasks_run_only_if_the_call_succeeded() {
    let (layer, errors) = reporting();
    let background = layer.handle();
    let ran = Probe::new();
    let mut client = serve(layer, &ran).await;
    assert_eq!(unary(&mut client, "hello").await, Code::Ok);
    assert_eq!(ran.next().await, "hello");
    assert_eq!(unary(&mut client, "fail").await, Code::NotFound);
    assert_not_met(&errors.next().await, "after_unary");
    within(background.idle()).await;
    assert!(ran.drain_now().await.is_empty(), "a failed call's task ran");
    let stats = background.stats();
    assert_eq!((stats.succeeded, stats.not_met), (1, 1), "{stats}");
}

/// A server stream: its task runs after the trailers of a stream that ended well; a
/// stream that failed midway (its status in the trailers, after two messages) runs none.
#[tokio::test]
async fn a_streams_tasks_run_only_if_its_trailers_say_it_succeeded() {
    let (layer, errors) = reporting();
    let background = layer.handle();
    let ran = Probe::new();
    let mut client = serve(layer, &ran).await;
    assert_eq!(streamed(&mut client, "whole").await, (2, Code::Ok));
    assert_eq!(ran.next().await, "whole");
    assert_eq!(streamed(&mut client, "fail").await, (2, Code::Internal));
    assert_not_met(&errors.next().await, "after_stream");
    within(background.idle()).await;
    assert!(
        ran.drain_now().await.is_empty(),
        "a failed stream's task ran"
    );
}

/// A stream the client cancels midway never completes: its task does not run, and is
/// reported; the drain is not held by it.
#[tokio::test]
async fn a_stream_the_client_cancels_runs_no_task() {
    let (layer, errors) = reporting();
    let background = layer.handle();
    let ran = Probe::new();
    let mut client = serve(layer, &ran).await;
    within(client.ready()).await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Stream");
    let codec = ProstCodec::<Say, Say>::default();
    let mut messages = within(client.server_streaming(say("hang"), path, codec))
        .await
        .unwrap()
        .into_inner();
    within(messages.message()).await.unwrap().unwrap();
    drop(messages);
    assert_not_met(&errors.next().await, "after_stream");
    let report = within(background.shutdown(PATIENCE)).await;
    assert!(report.is_drained(), "{report}");
    assert!(ran.drain_now().await.is_empty());
}
