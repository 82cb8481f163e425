//! OpenTelemetry, with an exporter we did not write: tracing-opentelemetry over the SDK's
//! in-memory exporter (spans exported as they end), behind a real hyper server whose outer
//! service makes the request's span, as tower-http's `TraceLayer` does. With
//! `TaskSpans::Linked`, the request's span is exported when the response is complete,
//! while its task still runs; the task's span is exported under the task's name, in a
//! trace of its own whose root links to the request.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;

use common::{Probe, Proto, full, get, serve_service, until};
use http::Response;
use hyper::body::Incoming;
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::{Layer, ServiceExt, service_fn};
use tower_background::{BackgroundLayer, Task, TaskSpans};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn exported(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter.get_finished_spans().unwrap()
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Option<&'a SpanData> {
    spans.iter().find(|span| span.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_request_is_exported_before_its_task_ends_and_the_task_under_its_name() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let (started, release) = (Probe::new(), Probe::<()>::new());
    let app = {
        let layer = BackgroundLayer::new().task_spans(TaskSpans::Linked);
        let (started, release) = (started.clone(), release.clone());
        layer.layer(service_fn(move |_req: http::Request<Incoming>| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let task = Task::new(async move {
                    started.send(());
                    release.next().await;
                })
                .named("send_email");
                let mut res = Response::new(full("Created"));
                res.extensions_mut().insert(task);
                Ok::<_, Infallible>(res)
            }
        }))
    };
    let traced = service_fn(move |req: http::Request<Incoming>| {
        app.clone()
            .oneshot(req)
            .instrument(tracing::info_span!("request"))
    });
    let addr = serve_service(traced).await;
    get(Proto::Http1, addr, "/").await;
    started.next().await;

    // The task still runs: the request is exported all the same.
    until("the request's span is exported", || {
        named(&exported(&exporter), "request").is_some()
    })
    .await;
    assert!(
        named(&exported(&exporter), "send_email").is_none(),
        "the task ended already"
    );

    release.send(());
    until("the task's span is exported", || {
        let spans = exported(&exporter);
        named(&spans, "send_email").is_some() && named(&spans, "background_tasks").is_some()
    })
    .await;
    let spans = exported(&exporter);
    let request = named(&spans, "request").unwrap();
    let root = named(&spans, "background_tasks").unwrap();
    let task = named(&spans, "send_email").unwrap();
    // A trace of its own, whose root links to the request.
    assert_ne!(
        task.span_context.trace_id(),
        request.span_context.trace_id()
    );
    assert_eq!(task.span_context.trace_id(), root.span_context.trace_id());
    assert_eq!(task.parent_span_id, root.span_context.span_id());
    let links = &root.links.links;
    assert!(
        links
            .iter()
            .any(|link| link.span_context == request.span_context),
        "no link to the request in {links:?}"
    );
}
