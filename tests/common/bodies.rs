//! Every hand-written response body the tests serve, in one place: what each one tells
//! hyper (its frames, `size_hint`, `is_end_stream`) is what the test is about. The
//! property tests' generated bodies stay beside their generators (`hyper_oracle`,
//! `model`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::{BoxedBody, Probe};

type Polled = Poll<Option<Result<Frame<Bytes>, io::Error>>>;

/// A response body whose frames the test releases one at a time.
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        self.rx.poll_recv(cx)
    }
}

/// The sending side of a [`ChannelBody`].
pub type Chunks = mpsc::UnboundedSender<Result<Frame<Bytes>, io::Error>>;

/// A streamed body and the handle that releases its frames; the body ends when the handle
/// is dropped.
pub fn channel_body() -> (Chunks, BoxedBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChannelBody { rx }.boxed_unsync())
}

/// `body` with an exact size hint of `len`, whatever it holds, and never at its end before
/// it is polled to `None` (`is_end_stream` keeps its default, `false`). With the right
/// `len`, hyper's HTTP/1.1 server writes `content-length` from the hint and drops the body
/// after the last byte, without polling it to its end.
pub fn hinted(body: BoxedBody, len: u64) -> BoxedBody {
    Hinted(body, len).boxed_unsync()
}

struct Hinted(BoxedBody, u64);

impl Body for Hinted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.1)
    }
}

/// A streamed body that answers `is_end_stream()` and `size_hint()` one way the first time
/// it is asked and another way afterwards: with `exact_first`, its first `size_hint()` is
/// "exact 6" and the later ones "not exact"; with `ends_after_first_look`, its first
/// `is_end_stream()` is `false` and the later ones `true` (else always `false`). hyper asks
/// the layer's body wrapper, which asks this body: only the answers hyper got may decide
/// when the response is complete.
pub fn fickle(exact_first: bool, ends_after_first_look: bool) -> (Chunks, BoxedBody) {
    let (tx, frames) = mpsc::unbounded_channel();
    let body = Fickle {
        frames,
        asked_hint: AtomicUsize::new(0),
        asked_end: AtomicUsize::new(0),
        exact_first,
        ends_after_first_look,
    };
    (tx, body.boxed_unsync())
}

struct Fickle {
    frames: mpsc::UnboundedReceiver<Result<Frame<Bytes>, io::Error>>,
    asked_hint: AtomicUsize,
    asked_end: AtomicUsize,
    exact_first: bool,
    ends_after_first_look: bool,
}

impl Body for Fickle {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        self.frames.poll_recv(cx)
    }

    fn is_end_stream(&self) -> bool {
        let calls = self.asked_end.fetch_add(1, SeqCst);
        self.ends_after_first_look && calls > 0
    }

    fn size_hint(&self) -> SizeHint {
        match (self.exact_first, self.asked_hint.fetch_add(1, SeqCst)) {
            (true, 0) => SizeHint::with_exact(6),
            _ => SizeHint::default(),
        }
    }
}

/// A body whose `poll_frame` panics.
pub struct PanickingBody;

impl Body for PanickingBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Polled {
        panic!("the body's poll_frame panicked")
    }
}

/// An empty body whose `size_hint` panics.
pub struct HintPanics;

impl Body for HintPanics {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Polled {
        Poll::Ready(None)
    }

    fn size_hint(&self) -> SizeHint {
        panic!("the body's size_hint panicked")
    }
}

/// Wraps a body and reports to `report`, when dropped, how the server consumed it.
pub fn observed(inner: BoxedBody, report: Probe<String>) -> BoxedBody {
    Observed {
        inner,
        frames: 0,
        saw_none: false,
        waiting: false,
        report,
    }
    .boxed_unsync()
}

struct Observed {
    inner: BoxedBody,
    frames: usize,
    saw_none: bool,
    /// The last poll returned `Pending`: the server was waiting for more.
    waiting: bool,
    report: Probe<String>,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.waiting = polled.is_pending();
        match &polled {
            Poll::Ready(Some(_)) => self.frames += 1,
            Poll::Ready(None) => self.saw_none = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.report
            .send(match (self.frames, self.saw_none, self.waiting) {
                (0, false, false) => "dropped unpolled".to_owned(),
                (n, false, false) => format!("dropped after {n} frame(s), no end of stream"),
                (n, false, true) => {
                    format!("still polling after {n} frame(s): dropped as the client left")
                }
                (n, true, _) => format!("polled to None after {n} frame(s)"),
            });
    }
}
