//! [`ResponseFuture`]: the response future of [`Background`](crate::Background).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::body::BackgroundBody;
use crate::completion::{Attached, Completion, ResponseShape};
use crate::layer::Config;
use crate::tasks::Tasks;

pin_project! {
    /// The response future of [`Background`](crate::Background): resolves to the inner
    /// service's response with its body wrapped in a [`BackgroundBody`].
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
        is_head: bool,
        request_tasks: Option<Tasks>,
        config: Arc<Config>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        is_head: bool,
        request_tasks: Option<Tasks>,
        config: Arc<Config>,
    ) -> Self {
        ResponseFuture {
            inner,
            is_head,
            request_tasks,
            config,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<BackgroundBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        let request_tasks = this.request_tasks.take();
        let Some(attached) = Attached::take_from(res.extensions_mut(), request_tasks, this.config)
        else {
            return Poll::Ready(Ok(res.map(BackgroundBody::passthrough)));
        };
        let shape = ResponseShape {
            is_head: *this.is_head,
            status: res.status(),
            headers: res.headers(),
            body_at_end: res.body().is_end_stream(),
        };
        let completion = Completion::new(attached, shape);
        Poll::Ready(Ok(
            res.map(|body| BackgroundBody::new(body, Some(completion)))
        ))
    }
}
