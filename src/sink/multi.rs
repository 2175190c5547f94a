//! Several targets as one sink (e.g. a Redis per region): a batch is
//! applied to all of them concurrently and confirmed only when every one
//! confirmed it.
//!
//! **Invariants:** `Ok` only if every target returned `Ok`; every target is
//! driven to its own end (a failing one does not cancel the others, whose
//! work then need not be redone by much); the error returned is the most
//! severe one (definite over transient), the others are logged.

use futures_util::future::join_all;

use crate::sink::{Sink, SinkBatch, SinkCause, SinkError};

/// The most severe target's cause, when others failed too.
#[derive(Debug, thiserror::Error)]
#[error("{first} (and {more} more targets)")]
pub(crate) struct AndMore {
    #[source]
    pub(crate) first: SinkCause,
    /// How many other targets did not confirm (logged one by one).
    pub(crate) more: usize,
}

/// Applies each batch to every target.
#[derive(Debug)]
pub struct MultiSink<S> {
    name: String,
    targets: Vec<S>,
}

impl<S: Sink> MultiSink<S> {
    /// A sink over `targets`, named after them (`primary+eu`).
    pub fn new(targets: Vec<S>) -> MultiSink<S> {
        let name = targets.iter().map(|t| t.name()).collect::<Vec<_>>().join("+");
        MultiSink { name, targets }
    }

    pub(crate) fn targets(&self) -> &[S] {
        &self.targets
    }
}

impl<S: Sink + Sync> Sink for MultiSink<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn acknowledged(&self, position: &crate::change::Position) {
        for target in &self.targets {
            target.acknowledged(position);
        }
    }

    async fn apply(&self, batch: SinkBatch<'_>) -> Result<(), SinkError> {
        let results = join_all(self.targets.iter().map(|t| t.apply(batch))).await;
        let mut worst: Option<SinkError> = None;
        let mut failed = 0usize;
        for error in results.into_iter().filter_map(Result::err) {
            failed += 1;
            tracing::warn!(batch_id = batch.id, error = %error, "target did not confirm the batch");
            if matches!((&worst, &error), (None, _) | (Some(SinkError::Transient { .. }), SinkError::Definite { .. })) {
                worst = Some(error);
            }
        }
        match worst {
            None => Ok(()),
            Some(e) if failed == 1 => Err(e),
            Some(SinkError::Transient { target, cause }) => {
                Err(SinkError::transient(target, AndMore { first: cause, more: failed - 1 }))
            }
            Some(SinkError::Definite { target, cause }) => {
                Err(SinkError::definite(target, AndMore { first: cause, more: failed - 1 }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::diagnostic::SourceFile;
    use crate::graph::load::load_sources;

    /// A sink that answers what it was told to, after counting the call.
    struct Fake {
        name: &'static str,
        answer: Option<bool>,
        calls: AtomicUsize,
    }

    impl Sink for Fake {
        fn name(&self) -> &str {
            self.name
        }

        fn apply(&self, _: SinkBatch<'_>) -> impl Future<Output = Result<(), SinkError>> + Send {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (target, answer) = (self.name.to_owned(), self.answer);
            async move {
                match answer {
                    None => Ok(()),
                    Some(false) => Err(SinkError::transient(target, "down")),
                    Some(true) => Err(SinkError::definite(target, "refused")),
                }
            }
        }
    }

    fn fake(name: &'static str, answer: Option<bool>) -> Fake {
        Fake { name, answer, calls: AtomicUsize::new(0) }
    }

    fn run(sink: &MultiSink<Fake>) -> Result<(), SinkError> {
        let graph = load_sources(&[SourceFile::new("g.toml", String::new())]).unwrap();
        let batch =
            SinkBatch { id: 1, graph: &graph, effects: &[], version: 1, position: None, commit_time_micros: None };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(sink.apply(batch))
    }

    #[test]
    fn confirms_only_when_every_target_confirmed() {
        let sink = MultiSink::new(vec![fake("a", None), fake("b", None)]);
        assert_eq!(sink.name(), "a+b");
        assert!(run(&sink).is_ok());

        let sink = MultiSink::new(vec![fake("a", None), fake("b", Some(false))]);
        let err = run(&sink).unwrap_err();
        assert!(matches!(&err, SinkError::Transient { target, .. } if target == "b"), "{err:?}");
        assert!(sink.targets().iter().all(|t| t.calls.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn a_definite_failure_outranks_a_transient_one() {
        let sink = MultiSink::new(vec![fake("a", Some(false)), fake("b", Some(true)), fake("c", None)]);
        let err = run(&sink).unwrap_err();
        assert!(matches!(&err, SinkError::Definite { target, .. } if target == "b"), "{err:?}");
        assert!(err.to_string().contains("and 1 more targets"), "{err}");
    }
}
