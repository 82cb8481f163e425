//! [`ParentSpan`]: the `tracing` context a task inherits from its request (feature
//! `tracing`); an empty type without the feature.

#[cfg(feature = "tracing")]
use crate::contain::TARGET;

/// The span that was current when the response was produced. Each task runs in a child of
/// it, so that a task's events join its request's trace.
#[derive(Debug, Clone)]
pub(crate) struct ParentSpan {
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

impl ParentSpan {
    /// The span current now.
    pub(crate) fn current() -> Self {
        ParentSpan {
            #[cfg(feature = "tracing")]
            span: tracing::Span::current(),
        }
    }

    /// No span: for a ledger with nothing left to run.
    #[cfg(feature = "tracing")]
    pub(crate) fn none() -> Self {
        ParentSpan {
            span: tracing::Span::none(),
        }
    }

    /// Runs `f` in this span: the reports of the response's tasks are made there (its
    /// request's span, or the `background_tasks` root of linked spans), so that they join
    /// the trace their tasks ran in.
    pub(crate) fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "tracing")]
        return self.span.in_scope(f);
        #[cfg(not(feature = "tracing"))]
        f()
    }

    /// At the response's completion, with [`TaskSpans::Linked`](crate::TaskSpans::Linked):
    /// the request's span is let go, so that it ends with its response (an exporter
    /// receives it then, not once the tasks end), and the tasks' parent becomes a root span
    /// `background_tasks` of a trace of their own, linked to it (`follows_from`).
    #[cfg(feature = "tracing")]
    pub(crate) fn link_instead(&mut self) {
        let root = tracing::info_span!(target: TARGET, parent: None, "background_tasks");
        root.follows_from(&self.span);
        self.span = root;
    }

    /// The span a task runs in: `background_task` (INFO, target `tower_background`), with
    /// the task's name and position, and the name as `otel.name`, which
    /// tracing-opentelemetry gives the exported span; a child of the request's span, or
    /// (linked) of the response's `background_tasks` root.
    #[cfg(feature = "tracing")]
    pub(crate) fn task_span(&self, name: &str, position: usize) -> tracing::Span {
        tracing::info_span!(
            target: TARGET,
            parent: &self.span,
            "background_task",
            task = name,
            position,
            otel.name = name
        )
    }
}
