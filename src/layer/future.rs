//! [`ResponseFuture`]: the response future of [`Background`](crate::Background).

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::layer::body::BackgroundBody;
use crate::layer::completion::{Attached, Completion};
use crate::layer::framing::{RequestKind, ResponseShape};
use crate::run::config::Config;
use crate::task::set::Tasks;
use crate::tracker::Entry;

pin_project! {
    /// The response future of [`Background`](crate::Background): resolves to the inner
    /// service's response with its body wrapped in a [`BackgroundBody`].
    ///
    /// Dropped before the inner service answered (the client went away, an outer timeout
    /// answered instead), or resolved to the inner service's error, it reports the
    /// request-scoped tasks, if any, as not run
    /// ([`SkipReason::NoResponse`](crate::SkipReason::NoResponse)).
    ///
    /// From the call until it resolves or is dropped, it keeps the layer's drain
    /// ([`BackgroundHandle::shutdown`](crate::BackgroundHandle::shutdown)) waiting: the
    /// handler may still attach tasks to its response.
    ///
    /// ```
    /// use http::{Request, Response};
    /// use tower::{Service, service_fn};
    /// use tower_background::{BackgroundLayer, ResponseFuture};
    /// use tower_layer::Layer;
    ///
    /// # #[tokio::main] async fn main() {
    /// let mut svc = BackgroundLayer::new().layer(service_fn(|_req: Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    /// }));
    /// let future: ResponseFuture<_> = svc.call(Request::new(()));
    /// let res = future.await.unwrap();
    /// # }
    /// ```
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        request: RequestKind,
        request_tasks: Option<Tasks>,
        config: Arc<Config>,
        // Keeps the drain waiting until the handler answered.
        in_flight: Option<Entry>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(tasks) = this.request_tasks.take() {
                Attached::abandon(tasks, this.config);
            }
            if let Some(entry) = this.in_flight.take() {
                this.config.shared.tracker.leave(entry);
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn new(
        inner: F,
        request: RequestKind,
        request_tasks: Option<Tasks>,
        config: Arc<Config>,
        in_flight: Entry,
    ) -> Self {
        ResponseFuture {
            inner,
            request,
            request_tasks,
            config,
            in_flight: Some(in_flight),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<BackgroundBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = ready!(this.inner.poll(cx));
        let request_tasks = this.request_tasks.take();
        let res = match outcome {
            // The path of most responses: no tasks anywhere, nothing to look into.
            Ok(res) if request_tasks.is_none() && res.extensions().is_empty() => {
                Ok(res.map(BackgroundBody::passthrough))
            }
            Ok(res) => Ok(with_tasks(res, request_tasks, *this.request, this.config)),
            Err(error) => {
                if let Some(tasks) = request_tasks {
                    Attached::abandon(tasks, this.config);
                }
                Err(error)
            }
        };
        // The response's tasks, if any, took a token of the drain of their own: the drain
        // never sees a gap.
        if let Some(entry) = this.in_flight.take() {
            this.config.shared.tracker.leave(entry);
        }
        Poll::Ready(res)
    }
}

/// The response of a request or a response that may carry tasks: takes them, and wraps
/// the body in what starts them once the response is complete. Kept out of
/// [`ResponseFuture::poll`], so that the path of a response without tasks stays small.
#[inline(never)]
fn with_tasks<B: Body>(
    mut res: Response<B>,
    request_tasks: Option<Tasks>,
    request: RequestKind,
    config: &Arc<Config>,
) -> Response<BackgroundBody<B>> {
    let Some(mut attached) = Attached::take_from(res.extensions_mut(), request_tasks, config)
    else {
        return res.map(BackgroundBody::passthrough);
    };
    let met = attached.judge(res.status(), res.headers());
    // What the body says of itself now counts only if no one asks the wrapper before the
    // body is first polled or dropped (not hyper, which always asks: its answers decide).
    // The body's own methods are user code: if one panics, the response never leaves,
    // which is an early drop for the tasks already counted.
    let body = res.body();
    let asked = catch_unwind(AssertUnwindSafe(|| {
        (body.is_end_stream(), body.size_hint().exact())
    }));
    let (body_at_end, exact_size) = match asked {
        Ok(answers) => answers,
        Err(panic) => {
            Completion::dropped_early(attached, met);
            resume_unwind(panic)
        }
    };
    let shape = ResponseShape {
        request,
        status: res.status(),
        headers: res.headers(),
        version: res.version(),
    };
    let own = (body_at_end, exact_size);
    let completion = Box::new(Completion::new(attached, met, shape, own));
    res.map(|body| BackgroundBody::new(body, Some(completion)))
}
