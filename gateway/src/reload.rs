//! Reloading on a change in the manifest's folder.
//!
//! The folder is watched, not the file: editors save by writing a new file and renaming it over
//! the old one, and Kubernetes updates a ConfigMap volume by swapping a symlinked folder, so a
//! watch on the file itself would stop seeing changes after the first one. Bursts of events (one
//! save is several) are debounced into one reload.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use crate::server::Shared;

/// Watches a folder and reloads the gateway when something in it changes. Dropping it stops
/// the watch.
pub(crate) struct FolderWatcher {
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FolderWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FolderWatcher {
    pub(crate) fn start(
        dir: &Path,
        debounce: Duration,
        shared: Arc<Shared>,
    ) -> Result<FolderWatcher, String> {
        // A capacity of one coalesces: changes that arrive while a reload runs make one more
        // reload after it, which reads the newest files.
        let (changed, mut changes) = mpsc::channel::<()>(1);
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            match result {
                Ok(events) => {
                    // Reading the manifest and plugins is not a change; only writes count.
                    let relevant = events.iter().any(|event| {
                        matches!(
                            event.kind,
                            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                        )
                    });
                    if relevant {
                        let _ = changed.try_send(());
                    }
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(error = %error, "watching the manifest's folder");
                    }
                }
            }
        })
        .map_err(|err| err.to_string())?;
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|err| err.to_string())?;
        let task = tokio::spawn(async move {
            while changes.recv().await.is_some() {
                tracing::info!("the manifest's folder changed: reloading");
                // Errors are logged and counted by `reload`.
                let _ = shared.reload().await;
            }
        });
        Ok(FolderWatcher {
            _debouncer: debouncer,
            task,
        })
    }
}
