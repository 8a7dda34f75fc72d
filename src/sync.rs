//! Locking std mutexes, in one place.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also when a holder panicked: every mutex of this crate guards data that stays
/// consistent between statements, so a panic elsewhere does not make it unusable.
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "only tests lock std mutexes in this branch; the engine and the providers switch to it when issue #10's branches merge"
    )
)]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
