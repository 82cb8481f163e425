//! [`Jobs`]: the tasks of one run, in the order they run; a lone task is kept inline.

use std::ops::{Deref, DerefMut};

use crate::job::Job;

/// The tasks of one run. Most responses carry one [`Task`](crate::Task): it is kept in
/// place rather than in a list of its own, which would cost an allocation per response
/// (measured by `benches/instructions.sh`). A `Tasks` brings its own list, reused as is.
pub(crate) enum Jobs {
    One(Job),
    Many(Vec<Job>),
}

impl Jobs {
    /// Adds `more` after the tasks already here.
    pub(crate) fn extend(&mut self, more: Vec<Job>) {
        match self {
            Jobs::Many(jobs) => jobs.extend(more),
            Jobs::One(_) if more.is_empty() => {}
            Jobs::One(_) => {
                let mut jobs = Vec::with_capacity(1 + more.len());
                if let Jobs::One(one) = std::mem::replace(self, Jobs::Many(Vec::new())) {
                    jobs.push(one);
                }
                jobs.extend(more);
                *self = Jobs::Many(jobs);
            }
        }
    }
}

impl Deref for Jobs {
    type Target = [Job];

    fn deref(&self) -> &[Job] {
        match self {
            Jobs::One(job) => std::slice::from_ref(job),
            Jobs::Many(jobs) => jobs,
        }
    }
}

impl DerefMut for Jobs {
    fn deref_mut(&mut self) -> &mut [Job] {
        match self {
            Jobs::One(job) => std::slice::from_mut(job),
            Jobs::Many(jobs) => jobs,
        }
    }
}
