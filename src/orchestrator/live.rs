//! A deployment's parsed settings as the engine holds them while it runs, and the masking of
//! its secrets in everything a person may read.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DeploymentConfig;
use crate::metadata::MetadataGenerator;

/// A deployment's parsed settings, loaded once.
pub(crate) struct Live {
    pub(crate) config: Arc<DeploymentConfig>,
    pub(crate) metadata: MetadataGenerator,
    /// Secret values to mask in logs and messages.
    pub(crate) secrets: Vec<String>,
    /// Fires on a terminate request: stops provisioning and retries of this deployment. Not
    /// fired by engine shutdown, which is not the deployment's end: what waits is left as it
    /// is, for a restarted engine to resume.
    pub(crate) cancel: CancellationToken,
    /// The releases of its nodes' instances under way, so cleanup waits for them.
    pub(crate) releases: TaskTracker,
    /// The worker bundle, read on the first `GET /nodes/assets`, when it is small enough to
    /// keep in memory while the deployment runs (`None` when it is not): sent to every node
    /// with the answer's headers, without a file read per node.
    pub(crate) small_bundle: tokio::sync::OnceCell<Option<bytes::Bytes>>,
    /// The downloads of a larger worker bundle under way, which share the file and the chunks
    /// read from it.
    pub(crate) bundle_downloads: crate::bundle::serve::BundleDownloads,
}

impl Live {
    /// The settings of a deployment, parsed from its `taskfly.yml`.
    pub(crate) fn new(config: DeploymentConfig, metadata: MetadataGenerator) -> Live {
        Live {
            secrets: secret_values(&config),
            config: Arc::new(config),
            metadata,
            cancel: CancellationToken::new(),
            releases: TaskTracker::new(),
            small_bundle: tokio::sync::OnceCell::new(),
            bundle_downloads: Default::default(),
        }
    }

    /// `text` with every secret value replaced by `***`.
    ///
    /// Agents cut long lines into pieces and quote at most 500 characters of a failing line,
    /// so a secret may also arrive cut in two: a text that ends with the start of a secret
    /// (followed or not by the `…` of a cut message), or starts with its end (at least
    /// [`MIN_PARTIAL_SECRET`] characters), has that part masked too.
    pub(crate) fn mask(&self, text: &str) -> String {
        mask_secrets(text, &self.secrets)
    }
}

/// Shortest piece of a cut secret that is masked at the edges of a text.
const MIN_PARTIAL_SECRET: usize = 4;

/// What agents append to a failure message they cut.
const CUT_MARK: &str = "…";

fn mask_secrets(text: &str, secrets: &[String]) -> String {
    let mut masked = text.to_owned();
    for secret in secrets {
        if masked.contains(secret.as_str()) {
            masked = masked.replace(secret.as_str(), "***");
        }
    }
    for secret in secrets {
        // The longest start of the secret that ends the text (before the `…` a cut leaves)...
        let starts: Vec<usize> = secret.char_indices().map(|(i, _)| i).collect();
        let cut_mark = if masked.ends_with(CUT_MARK) {
            CUT_MARK
        } else {
            ""
        };
        let body = &masked[..masked.len() - cut_mark.len()];
        let tail = starts
            .iter()
            .copied()
            .filter(|&i| i >= MIN_PARTIAL_SECRET)
            .rev()
            .find(|&i| body.ends_with(&secret[..i]));
        if let Some(i) = tail {
            masked.truncate(body.len() - i);
            masked.push_str("***");
            masked.push_str(cut_mark);
        }
        // ...and the longest end of the secret that starts it.
        let head = starts
            .iter()
            .copied()
            .filter(|&i| i > 0 && secret.len() - i >= MIN_PARTIAL_SECRET)
            .find(|&i| masked.starts_with(&secret[i..]));
        if let Some(i) = head {
            masked = format!("***{}", &masked[secret.len() - i..]);
        }
    }
    masked
}

fn secret_values(config: &DeploymentConfig) -> Vec<String> {
    let mut values: Vec<String> = config
        .nodes
        .secrets
        .values()
        .filter(|v| !v.is_empty())
        .cloned()
        .collect();
    // Longest first, so a secret that contains another is masked whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

#[cfg(test)]
mod tests {
    use super::mask_secrets;

    #[test]
    fn secrets_are_masked_whole_and_where_a_cut_left_a_piece() {
        let secrets = vec!["PLANTEDabcdefgh".to_owned()];
        assert_eq!(mask_secrets("x PLANTEDabcdefgh y", &secrets), "x *** y");
        // A line cut inside the secret: both pieces are masked.
        assert_eq!(mask_secrets("xxxxPLANTE", &secrets), "xxxx***");
        assert_eq!(mask_secrets("Dabcdefgh tail", &secrets), "*** tail");
        // Fewer than four characters of a secret are too common to mask.
        assert_eq!(mask_secrets("xxxPLA", &secrets), "xxxPLA");
        assert_eq!(mask_secrets("fgh tail", &secrets), "fgh tail");
        assert_eq!(mask_secrets("no secret here", &secrets), "no secret here");
        let unicode = vec!["sécret-ünïcode".to_owned()];
        assert_eq!(mask_secrets("a sécret-ü", &unicode), "a ***");
    }

    #[test]
    fn a_secret_cut_by_a_failure_message_limit_is_masked_before_the_cut_mark() {
        let secrets = vec!["PLANTEDabcdefgh".to_owned()];
        assert_eq!(
            mask_secrets("exited: xxPLANTEDab…", &secrets),
            "exited: xx***…"
        );
        assert_eq!(mask_secrets("exited: xxPLA…", &secrets), "exited: xxPLA…");
        assert_eq!(mask_secrets("nothing cut…", &secrets), "nothing cut…");
    }
}
