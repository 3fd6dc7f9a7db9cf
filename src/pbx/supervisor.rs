//! PBX-neutral call supervision, written once for every adapter: capacity (`max_calls`),
//! draining on SIGTERM with a grace period, and per-call tasks whose end is guarded: whether a
//! call returns or its task panics, the adapter's `after` step runs (the caller reaches a human
//! or is hung up, the PBX objects are removed) and the call's slot is freed. It also holds the
//! state `/health` and `/ready` report.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::call::{CallOutcome, CallSetup, run_call};
use crate::engines::asr::EngineLoad;
use crate::pbx::events::CallEvents;
use crate::telemetry::names;

/// What an adapter does for a call the supervisor runs: send the caller to its overflow target,
/// and tell whether a caller whose media ended has really hung up.
#[async_trait::async_trait]
pub trait CallerRoute: Send + Sync {
    /// Sends the caller to the overflow target (a human); hangs up if that fails.
    async fn to_overflow(&self, why: &str);
    /// The media side ended the call: did the caller hang up (else they are still there, in
    /// silence)?
    async fn caller_left(&self) -> bool;
}

/// Runs one call to its end, the same for every PBX: when the grace period after SIGTERM is
/// over the caller goes to the overflow target (the call ends as transferred there); a call
/// whose media ended under a live caller, or that could not end as it should (`Failed`), also
/// sends its caller to the overflow target. Nobody is left in silence.
pub async fn run_routed_call(
    setup: CallSetup,
    events: &CallEvents,
    overflow_target: &str,
    grace_over: CancellationToken,
    route: &dyn CallerRoute,
) -> CallOutcome {
    let call_id = setup.call_id.clone();
    let call = run_call(setup);
    tokio::pin!(call);
    let outcome = tokio::select! {
        o = &mut call => o,
        _ = grace_over.cancelled() => {
            // Told first, so the call ends as transferred to the overflow target, not as the
            // caller hanging up when the PBX reports them gone.
            events.taken_away(overflow_target, "grace period over").await;
            route.to_overflow("grace period over").await;
            call.await
        }
    };
    tracing::info!(%call_id, outcome = outcome.label(), "call finished");
    match &outcome {
        CallOutcome::CallerHungUp if !route.caller_left().await => {
            // The media side failed, not the caller.
            route.to_overflow("media ended under a live caller").await;
        }
        CallOutcome::Failed { stage } => {
            // No answer, no transfer, no hangup: a human, at least.
            route.to_overflow(&format!("{stage} failed")).await;
        }
        _ => {}
    }
    outcome
}

/// What `/health` and `/ready` report.
#[derive(Debug, Default)]
pub struct Health {
    /// Which PBX this process serves ("asterisk"), empty when none.
    pub pbx: String,
    /// The PBX control connection (ARI events, ESL) is up.
    pub control_connected: Arc<AtomicBool>,
    pub active_calls: AtomicUsize,
    /// SIGTERM came: no new calls.
    pub draining: AtomicBool,
    /// How busy the shared ASR engine is.
    pub asr: Option<Arc<EngineLoad>>,
}

impl Health {
    pub fn control_up(&self) -> bool {
        self.control_connected.load(Ordering::Relaxed)
    }

    /// Ready for new calls: the control connection is up and the process is not draining.
    pub fn ready(&self) -> bool {
        (self.pbx.is_empty() || self.control_up()) && !self.draining.load(Ordering::Relaxed)
    }
}

/// Limits of a supervisor.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_calls: usize,
    /// After SIGTERM, how long active calls may go on before they go to the overflow target.
    pub grace: Duration,
    /// After the grace period, how long calls get to end before the adapter stops anyway.
    pub after_grace: Duration,
}

/// Why a new call was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("shutting down")]
    Draining,
    #[error("at capacity")]
    AtCapacity,
}

/// Supervises the calls of one adapter.
#[derive(Debug)]
pub struct Supervisor {
    limits: Limits,
    health: Arc<Health>,
    tracker: TaskTracker,
    grace_over: CancellationToken,
}

/// A call's place under `max_calls`; freed when dropped (also while a panic unwinds).
#[derive(Debug)]
pub struct Slot {
    health: Arc<Health>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.health.active_calls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Supervisor {
    pub fn new(limits: Limits, health: Arc<Health>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            health,
            tracker: TaskTracker::new(),
            grace_over: CancellationToken::new(),
        })
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Takes a new call if there is room and the process is not draining.
    pub fn admit(&self) -> Result<Slot, Refusal> {
        if self.health.draining.load(Ordering::Relaxed) {
            metrics::counter!(names::CALLS_TOTAL, "outcome" => "overflow").increment(1);
            return Err(Refusal::Draining);
        }
        let taken =
            self.health
                .active_calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.limits.max_calls).then_some(n + 1)
                });
        match taken {
            Ok(_) => Ok(Slot {
                health: self.health.clone(),
            }),
            Err(_) => {
                metrics::counter!(names::CALLS_TOTAL, "outcome" => "overflow").increment(1);
                Err(Refusal::AtCapacity)
            }
        }
    }

    /// Cancelled when the grace period after SIGTERM is over: a call still running then sends
    /// its caller to the overflow target.
    pub fn grace_over(&self) -> CancellationToken {
        self.grace_over.child_token()
    }

    /// Runs `call` on a task of its own, holding `slot`. When it ends, `after(panicked)` runs
    /// on the supervising task: with `true` when the call's task panicked or was aborted (the
    /// adapter then makes sure the caller reaches a human and removes what it created). The
    /// slot is freed after that.
    pub fn spawn<C, A, AF>(&self, slot: Slot, call: C, after: A)
    where
        C: Future<Output = ()> + Send + 'static,
        A: FnOnce(bool) -> AF + Send + 'static,
        AF: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(async move {
            let result = tokio::spawn(call).await;
            let panicked = match result {
                Ok(()) => false,
                Err(e) => {
                    tracing::error!(error = %e, "call task failed");
                    metrics::counter!(names::ERRORS, "stage" => "panic").increment(1);
                    true
                }
            };
            // `after` itself must not take the slot with it if it panics.
            if let Err(e) = tokio::spawn(after(panicked)).await {
                tracing::error!(error = %e, "cleaning up after a call failed");
            }
            drop(slot);
        });
    }

    /// Stops taking calls, lets active ones go on for the grace period, then cancels
    /// `grace_over` (they go to the overflow target) and waits a bounded time for them to end.
    pub async fn drain(&self) {
        self.health.draining.store(true, Ordering::Relaxed);
        self.tracker.close();
        let active = self.health.active_calls.load(Ordering::Relaxed);
        tracing::info!(
            active,
            grace_s = self.limits.grace.as_secs(),
            "shutting down: no new calls"
        );
        if tokio::time::timeout(self.limits.grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        tracing::info!(
            active = self.health.active_calls.load(Ordering::Relaxed),
            "grace period over: sending remaining calls to the overflow target"
        );
        self.grace_over.cancel();
        if tokio::time::timeout(self.limits.after_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.health.active_calls.load(Ordering::Relaxed),
                "calls did not end after the grace period; stopping anyway"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(max: usize) -> Arc<Supervisor> {
        Supervisor::new(
            Limits {
                max_calls: max,
                grace: Duration::from_secs(2),
                after_grace: Duration::from_secs(1),
            },
            Arc::new(Health::default()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_freed_even_when_a_call_panics() {
        let s = sup(1);
        let slot = s.admit().unwrap();
        assert_eq!(s.admit().unwrap_err(), Refusal::AtCapacity);
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.spawn(
            slot,
            async { panic!("injected") },
            move |panicked| async move {
                let _ = tx.send(panicked);
            },
        );
        assert!(rx.await.unwrap(), "after() learns of the panic");
        tokio::task::yield_now().await;
        for _ in 0..10 {
            if s.admit().is_ok() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the slot was never freed");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_refuses_new_calls_and_ends_the_grace_for_the_rest() {
        let s = sup(10);
        let slot = s.admit().unwrap();
        let grace = s.grace_over();
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.spawn(
            slot,
            async move {
                grace.cancelled().await;
                let _ = tx.send(tokio::time::Instant::now());
            },
            |_| async {},
        );
        let t0 = tokio::time::Instant::now();
        s.drain().await;
        assert_eq!(s.admit().unwrap_err(), Refusal::Draining);
        assert!(!s.health().ready());
        let sent_at = rx.await.unwrap();
        assert_eq!(
            sent_at - t0,
            Duration::from_secs(2),
            "after the grace period"
        );
        assert_eq!(s.health().active_calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_returns_at_once_without_calls_and_gives_up_on_stuck_ones() {
        let s = sup(10);
        let t0 = tokio::time::Instant::now();
        s.drain().await;
        assert_eq!(tokio::time::Instant::now(), t0);
        let s = sup(10);
        let slot = s.admit().unwrap();
        s.spawn(slot, std::future::pending(), |_| async {});
        let t0 = tokio::time::Instant::now();
        s.drain().await;
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(3));
    }
}
