//! [`BackgroundBody`]: the response body, wrapped to see when it has been handed to the
//! server in full.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::layer::completion::{Completion, Next};

pin_project! {
    /// The response body of [`Background`](crate::Background): the inner body, unchanged,
    /// plus the fire-once state of the response's tasks, if it has any.
    ///
    /// It forwards every frame, `is_end_stream` and `size_hint` as they are, and starts the
    /// tasks once the response is complete, as hyper sends it: `poll_frame` returned
    /// `None`, a trailers frame, a data frame after which `is_end_stream()` is true, or,
    /// over HTTP/1.1, the bytes sent reached the length hyper frames the body with (its
    /// exact size hint, else its `Content-Length`). A body that hyper drops without
    /// polling (already at its end; over HTTP/1.1 a response to HEAD, or with status 1xx,
    /// 204 or 304; a 2xx answer to CONNECT) counts as complete when dropped. Any other drop
    /// is an early drop; so is a body error, and so is any end of a response that hyper or
    /// a conforming client refuses (a malformed or conflicting `Content-Length`, a body
    /// shorter than it, or longer over HTTP/2).
    ///
    /// "Complete" means handed to the server in full: the client may still be receiving
    /// it.
    ///
    /// A response without tasks gets a wrapper that does nothing but forward.
    ///
    /// ```
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    /// use tower_background::{BackgroundBody, BackgroundLayer};
    ///
    /// # #[tokio::main] async fn main() {
    /// let svc = ServiceBuilder::new()
    ///     .layer(BackgroundLayer::new())
    ///     .service_fn(|_req: Request<()>| async {
    ///         Ok::<_, std::convert::Infallible>(Response::new(Full::from("hi")))
    ///     });
    /// let res: Response<BackgroundBody<Full<bytes::Bytes>>> =
    ///     svc.oneshot(Request::new(())).await.unwrap();
    /// # }
    /// ```
    pub struct BackgroundBody<B> {
        #[pin]
        inner: B,
        completion: Option<Box<Completion>>,
    }

    impl<B> PinnedDrop for BackgroundBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(completion) = this.project().completion.take() {
                completion.dropped();
            }
        }
    }
}

impl<B> BackgroundBody<B> {
    pub(crate) fn new(inner: B, completion: Option<Box<Completion>>) -> Self {
        BackgroundBody { inner, completion }
    }

    /// A body that carries no tasks: it only forwards `inner`.
    ///
    /// ```
    /// use tower_background::BackgroundBody;
    ///
    /// let body = BackgroundBody::passthrough(http_body_util::Empty::<bytes::Bytes>::new());
    /// ```
    pub fn passthrough(inner: B) -> Self {
        BackgroundBody::new(inner, None)
    }

    /// The wrapped body.
    ///
    /// ```
    /// # let body = tower_background::BackgroundBody::passthrough(());
    /// let inner: &() = body.get_ref();
    /// ```
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Default> Default for BackgroundBody<B> {
    /// An empty body that carries no tasks: what layers such as tower-http's `CorsLayer`
    /// and `TimeoutLayer` answer with when they answer themselves.
    ///
    /// ```
    /// use tower_background::BackgroundBody;
    ///
    /// let body: BackgroundBody<http_body_util::Empty<bytes::Bytes>> = Default::default();
    /// ```
    fn default() -> Self {
        BackgroundBody::passthrough(B::default())
    }
}

impl<B: Body> Body for BackgroundBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(completion) = this.completion.as_mut() {
            // From its first poll on, the body's head is written: what it was told is final.
            completion.on_poll();
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if this.completion.is_some() {
            observe(this.completion, &frame);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if let Some(completion) = &self.completion {
            completion.told_end(end);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        if let Some(completion) = &self.completion {
            completion.told_size(hint.exact());
        }
        hint
    }
}

/// Tells the completion what the body yielded, and fires it if that ends the response.
/// Kept out of `poll_frame`, so that the path of a body without tasks stays small.
#[inline(never)]
fn observe<D: Buf, E>(slot: &mut Option<Box<Completion>>, frame: &Option<Result<Frame<D>, E>>) {
    let Some(completion) = slot.as_mut() else {
        return;
    };
    let next = match frame {
        None => completion.on_end(),
        Some(Err(_)) => completion.on_error(),
        Some(Ok(frame)) => match frame.data_ref() {
            Some(data) => completion.on_data(data.remaining()),
            None => match frame.trailers_ref() {
                Some(trailers) => {
                    completion.saw_trailers(trailers);
                    completion.on_end()
                }
                None => Next::Wait,
            },
        },
    };
    if let Next::Fire { early } = next {
        if let Some(completion) = slot.take() {
            completion.fire(early);
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for BackgroundBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundBody")
            .field("inner", &self.inner)
            .field("has_tasks", &self.completion.is_some())
            .finish()
    }
}
