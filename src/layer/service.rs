//! [`Background`]: the service that takes the tasks out of each response.

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Method, Request, Response, Version};
use http_body::Body;
use tower_service::Service;

use crate::backlog::Room;
use crate::layer::body::BackgroundBody;
use crate::layer::framing::RequestKind;
use crate::layer::future::ResponseFuture;
use crate::policy::Overload;
use crate::run::config::Config;
use crate::task::set::Tasks;

/// The service made by [`BackgroundLayer`](crate::BackgroundLayer): calls the inner
/// service, then takes the [`Tasks`] and the [`Task`](crate::Task) out of the
/// response's extensions and wraps its body in a
/// [`BackgroundBody`](crate::BackgroundBody) that starts them once the response is sent.
///
/// ```
/// use http::{Request, Response};
/// use tower::service_fn;
/// use tower_background::{Background, BackgroundLayer};
/// use tower_layer::Layer;
///
/// let inner = service_fn(|_req: Request<()>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(String::from("hi")))
/// });
/// let svc: Background<_> = BackgroundLayer::new().layer(inner);
/// ```
#[derive(Clone, Debug)]
pub struct Background<S> {
    inner: S,
    config: Arc<Config>,
    /// Under backpressure, `poll_ready`'s wait for room in the backlog (empty in a clone).
    room: Room,
}

impl<S> Background<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Background {
            inner,
            config,
            room: Room::default(),
        }
    }

    /// The wrapped service.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// # use tower_layer::Layer;
    /// let svc = BackgroundLayer::new().layer(42u8);
    /// assert_eq!(*svc.get_ref(), 42);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// # use tower_layer::Layer;
    /// let mut svc = BackgroundLayer::new().layer(42u8);
    /// *svc.get_mut() += 1;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// # use tower_layer::Layer;
    /// let svc = BackgroundLayer::new().layer(42u8);
    /// assert_eq!(svc.into_inner(), 42);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Background<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<BackgroundBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A full backlog under backpressure: not ready until a task leaves it. Nothing is
        // held for the call: its tasks, if it has any, take their places when its response
        // is complete.
        if let Some(backlog) = &self.config.backlog {
            if self.config.overload == Overload::Backpressure {
                ready!(self.room.poll_room(backlog, cx));
            }
        }
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Only flags are kept of the request: cloning an extension `Method` would allocate.
        let request = RequestKind {
            is_head: req.method() == Method::HEAD,
            is_connect: req.method() == Method::CONNECT,
            http2: req.version() == Version::HTTP_2,
            http10: req.version() == Version::HTTP_10,
        };
        let request_tasks = self.config.request_tasks.then(|| {
            let tasks = Tasks::request_scoped(&self.config);
            req.extensions_mut().insert(tasks.clone());
            tasks
        });
        // A drain waits for the handler from now on: its response may carry tasks.
        let in_flight = self.config.shared.tracker.enter();
        let future = self.inner.call(req);
        ResponseFuture::new(
            future,
            request,
            request_tasks,
            self.config.clone(),
            in_flight,
        )
    }
}
