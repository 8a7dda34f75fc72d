//! Locking std mutexes, in one place.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also when a holder panicked: every mutex of this crate guards data that stays
/// consistent between statements, so a panic elsewhere does not make it unusable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
