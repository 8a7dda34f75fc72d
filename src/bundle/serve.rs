//! Serving one large worker bundle to many nodes at once (`GET /nodes/assets`).
//!
//! The nodes of a deployment start together, so they ask for the same bundle at nearly the
//! same time and read it front to back at about the same pace. The downloads under way of one
//! bundle file therefore share a [`SharedBundle`]: the file, opened once, and a small cache of
//! the chunks read from it. A chunk is read from the file once (one positional read on
//! tokio's blocking pool, straight into the buffer that is sent) and handed to every download
//! that asks for it while it is cached; downloads asking for a chunk being read wait for that
//! read instead of starting their own.
//!
//! Bounds: the cache holds at most [`CACHED_CHUNKS`] chunks of [`CHUNK_BYTES`] (16 MiB) per
//! bundle, the least recently asked-for chunk going first; a download holds the chunk it is
//! sending. When the last download of a bundle ends, its [`SharedBundle`] (file and cache) is
//! dropped: nothing stays in memory between download sets.
//!
//! A download sends the file as it was when the download set opened it: a bundle deleted or
//! replaced meanwhile does not change the bytes of the downloads under way, and the next
//! download (of a replaced file) opens the new file, never mixing the two.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::OnceCell;

use crate::sync::lock;

/// The size of one read from the bundle file, and of each piece of the answer's body.
pub(crate) const CHUNK_BYTES: u64 = 256 * 1024;

/// How many chunks a bundle's downloads keep between them (16 MiB): downloads up to this far
/// behind the first one still find its chunks.
pub(crate) const CACHED_CHUNKS: usize = 64;

/// The downloads of one deployment's bundle: the [`SharedBundle`] under way, if any.
#[derive(Default)]
pub(crate) struct BundleDownloads {
    /// Held while a download looks for the bundle under way or opens the file, so that the
    /// first downloads of a set, arriving together, open it once and share it.
    current: tokio::sync::Mutex<Weak<SharedBundle>>,
}

impl BundleDownloads {
    /// The bundle at `path` to stream to one more node: the one the downloads under way share
    /// when the path still names that file, else the file opened afresh.
    pub(crate) async fn open(&self, path: &Path) -> io::Result<Arc<SharedBundle>> {
        let mut current = self.current.lock().await;
        if let Some(shared) = current.upgrade() {
            let metadata = tokio::fs::metadata(path).await?;
            if shared.identity == FileIdentity::of(&metadata) {
                return Ok(shared);
            }
        }
        let path = path.to_owned();
        let (file, metadata) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path)?;
            let metadata = file.metadata()?;
            Ok::<_, io::Error>((file, metadata))
        })
        .await
        .map_err(io::Error::other)??;
        let opened = Arc::new(SharedBundle {
            file: Arc::new(file),
            length: metadata.len(),
            identity: FileIdentity::of(&metadata),
            cache: Mutex::new(ChunkCache::default()),
            file_reads: AtomicU64::new(0),
        });
        *current = Arc::downgrade(&opened);
        Ok(opened)
    }

    /// The bundle the downloads under way share, `None` when none is under way.
    #[cfg(test)]
    async fn in_use(&self) -> Option<Arc<SharedBundle>> {
        self.current.lock().await.upgrade()
    }
}

/// What tells one file from another at the same path: a replaced file has another inode, a
/// file rewritten in place another length or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    length: u64,
    modified_ns: i128,
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            length: metadata.len(),
            modified_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        }
    }
}

/// One open bundle file and the chunks its downloads share.
pub(crate) struct SharedBundle {
    file: Arc<std::fs::File>,
    length: u64,
    identity: FileIdentity,
    cache: Mutex<ChunkCache>,
    /// Chunks read from the file so far (each read once while it stays cached).
    file_reads: AtomicU64,
}

/// The cached chunks by index, each with when it was last asked for.
#[derive(Default)]
struct ChunkCache {
    chunks: HashMap<u64, CachedChunk>,
    clock: u64,
}

struct CachedChunk {
    /// Filled by the first download to ask for it; the others wait for that read.
    bytes: Arc<OnceCell<Bytes>>,
    last_asked: u64,
}

impl SharedBundle {
    /// The file's length in bytes, the answer's `Content-Length`.
    pub(crate) fn length(&self) -> u64 {
        self.length
    }

    /// The whole file, chunk by chunk; a failed read ends the stream with its error (the
    /// answer is then cut short of its `Content-Length`, which the node sees).
    pub(crate) fn stream(self: Arc<Self>) -> impl Stream<Item = io::Result<Bytes>> + Send {
        futures_util::stream::try_unfold((self, 0u64), |(bundle, index)| async move {
            if index * CHUNK_BYTES >= bundle.length {
                return Ok(None);
            }
            let chunk = bundle.chunk(index).await?;
            Ok(Some((chunk, (bundle, index + 1))))
        })
    }

    /// Chunk `index`, from the cache or read from the file.
    async fn chunk(&self, index: u64) -> io::Result<Bytes> {
        let cell = {
            let mut cache = lock(&self.cache);
            cache.clock += 1;
            let now = cache.clock;
            if !cache.chunks.contains_key(&index) && cache.chunks.len() >= CACHED_CHUNKS {
                let oldest = cache
                    .chunks
                    .iter()
                    .min_by_key(|(_, chunk)| chunk.last_asked)
                    .map(|(&oldest, _)| oldest);
                if let Some(oldest) = oldest {
                    cache.chunks.remove(&oldest);
                }
            }
            let chunk = cache.chunks.entry(index).or_insert_with(|| CachedChunk {
                bytes: Arc::new(OnceCell::new()),
                last_asked: now,
            });
            chunk.last_asked = now;
            chunk.bytes.clone()
        };
        let bytes = cell.get_or_try_init(|| self.read_chunk(index)).await?;
        Ok(bytes.clone())
    }

    /// Chunk `index` read from the file, on the blocking pool.
    async fn read_chunk(&self, index: u64) -> io::Result<Bytes> {
        let offset = index * CHUNK_BYTES;
        let length =
            usize::try_from(CHUNK_BYTES.min(self.length - offset)).map_err(io::Error::other)?;
        let file = self.file.clone();
        self.file_reads.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0; length];
            file.read_exact_at(&mut buffer, offset)?;
            Ok(Bytes::from(buffer))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// How many chunks were read from the file so far.
    #[cfg(test)]
    fn file_reads(&self) -> u64 {
        self.file_reads.load(Ordering::Relaxed)
    }

    /// How many chunks the cache holds.
    #[cfg(test)]
    fn cached_chunks(&self) -> usize {
        lock(&self.cache).chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;

    use super::*;

    /// Incompressible-looking bytes, different for each `seed`.
    fn contents(length: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    async fn download(bundle: Arc<SharedBundle>) -> Vec<u8> {
        let chunks: Vec<Bytes> = bundle.stream().try_collect().await.expect("download");
        chunks.concat()
    }

    fn chunk_count(length: usize) -> u64 {
        (length as u64).div_ceil(CHUNK_BYTES)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_downloads_read_each_chunk_once_and_free_it_all_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("worker.tar.gz");
        // Ten and a half chunks: the last one is short.
        let data = contents(10 * CHUNK_BYTES as usize + CHUNK_BYTES as usize / 2, 1);
        std::fs::write(&path, &data).expect("write bundle");
        let downloads = Arc::new(BundleDownloads::default());

        // Eight downloads arriving together open the file once.
        let opening: Vec<_> = (0..8)
            .map(|_| {
                let (downloads, path) = (downloads.clone(), path.clone());
                tokio::spawn(async move { downloads.open(&path).await })
            })
            .collect();
        let mut opened = Vec::new();
        for task in opening {
            opened.push(task.await.expect("task").expect("open"));
        }
        let shared = downloads.in_use().await.expect("a download set under way");
        assert!(opened.iter().all(|bundle| Arc::ptr_eq(bundle, &shared)));
        assert_eq!(shared.length(), data.len() as u64);
        let tasks: Vec<_> = opened
            .into_iter()
            .map(|bundle| tokio::spawn(download(bundle)))
            .collect();
        for task in tasks {
            assert!(task.await.expect("task") == data, "a download differs");
        }
        // Every chunk stayed cached, so each was read from the file once for all eight.
        assert_eq!(shared.file_reads(), chunk_count(data.len()));

        let weak = Arc::downgrade(&shared);
        drop(shared);
        assert!(downloads.in_use().await.is_none());
        assert!(
            weak.upgrade().is_none(),
            "the file and its chunks outlive the downloads"
        );
    }

    #[tokio::test]
    async fn the_cache_keeps_at_most_its_bound_of_chunks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("worker.tar.gz");
        let data = contents((CACHED_CHUNKS + 9) * CHUNK_BYTES as usize + 1, 2);
        std::fs::write(&path, &data).expect("write bundle");
        let downloads = BundleDownloads::default();

        let first = downloads.open(&path).await.expect("open");
        assert!(download(first.clone()).await == data);
        assert_eq!(first.cached_chunks(), CACHED_CHUNKS);
        assert_eq!(first.file_reads(), chunk_count(data.len()));
        // A second download from the start finds none of the first chunks (evicted) but gets
        // every byte, and the cache stays within its bound.
        let second = downloads.open(&path).await.expect("open");
        assert!(Arc::ptr_eq(&first, &second));
        assert!(download(second).await == data);
        assert_eq!(first.cached_chunks(), CACHED_CHUNKS);
        assert_eq!(first.file_reads(), 2 * chunk_count(data.len()));
    }

    #[tokio::test]
    async fn a_replaced_or_deleted_bundle_leaves_downloads_under_way_unchanged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("worker.tar.gz");
        let old = contents(3 * CHUNK_BYTES as usize + 7, 3);
        let new = contents(2 * CHUNK_BYTES as usize + 11, 4);
        std::fs::write(&path, &old).expect("write bundle");
        let downloads = BundleDownloads::default();

        let under_way = downloads.open(&path).await.expect("open");
        let mut stream = Box::pin(under_way.clone().stream());
        let first = stream.try_next().await.expect("read").expect("a chunk");
        assert_eq!(first[..], old[..CHUNK_BYTES as usize]);

        // Replaced (a new file renamed over it): a new download gets the new file.
        let replacement = dir.path().join("worker.tar.gz.new");
        std::fs::write(&replacement, &new).expect("write replacement");
        std::fs::rename(&replacement, &path).expect("replace bundle");
        let later = downloads.open(&path).await.expect("open");
        assert!(!Arc::ptr_eq(&later, &under_way));
        assert!(download(later).await == new);

        // Deleted: the download under way still ends with the old bytes, a new one fails.
        std::fs::remove_file(&path).expect("delete bundle");
        let rest: Vec<Bytes> = stream.try_collect().await.expect("rest of the download");
        let mut whole = first.to_vec();
        whole.extend(rest.concat());
        assert!(whole == old);
        let error = downloads.open(&path).await.err().expect("a deleted bundle");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
