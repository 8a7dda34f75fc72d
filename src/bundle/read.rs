//! Reading and validating a bundle: every entry checked by one set of rules.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::rc::Rc;

use flate2::read::GzDecoder;
use tar::{Archive, EntryType};

use super::{
    BundleLimits, GZIP_MAGIC, MAX_LINK_HOPS, MAX_LINK_STEPS, MAX_PATH_BYTES, METADATA_BUDGET,
    NOT_GZIP_TAR,
};
use crate::{Error, Result};

/// One entry of a bundle, validated and normalized.
pub(super) enum Item {
    /// A regular file.
    File {
        path: String,
        mode: u32,
        size: u64,
        mtime: u64,
    },
    /// A directory.
    Dir { path: String, mode: u32, mtime: u64 },
    /// A symbolic link whose target stays inside the bundle.
    Symlink {
        path: String,
        target: String,
        mtime: u64,
    },
    /// An entry with nothing to write: the root directory (`./`) or a pax global header.
    Skip,
}

/// Reads the gzip tar `bundle`, validates each entry and hands it (with its data) to `visit`,
/// then checks every symbolic link against the whole archive. Returns the validator, which
/// knows the bundle's files.
pub(super) fn read_bundle<R: Read>(
    bundle: R,
    limits: &BundleLimits,
    mut visit: impl FnMut(&Item, &mut dyn Read) -> Result<()>,
) -> Result<Validator> {
    let stream = gzip_stream(bundle)?;
    let budget = Rc::new(Budget::default());
    let mut archive = Archive::new(BudgetReader {
        inner: stream,
        budget: Rc::clone(&budget),
    });
    let mut validator = Validator::new(*limits);
    let mut entries = archive
        .entries()
        .map_err(|e| Error::invalid_bundle(NOT_GZIP_TAR).with_source(e))?;
    loop {
        // The previous entry's unread data and padding are still allowed; the next entry's
        // headers get a budget of their own.
        budget.grant(METADATA_BUDGET);
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(validator.read_error(&budget, e)),
        };
        budget.set(padded(entry.size()));
        let item = validator.check(&entry)?;
        visit(&item, &mut entry)?;
    }

    // The tar stream ended, but the gzip stream's checksum and length come after it: read on to
    // its end so that a bundle cut short, or corrupted, is refused rather than half-trusted.
    // Trailing bytes past the budget are left unread, since no entry can hide in them.
    let mut rest = archive.into_inner();
    budget.grant(METADATA_BUDGET);
    if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
        if !budget.exceeded.get() {
            return Err(
                Error::invalid_bundle("bundle is truncated or corrupt at its end").with_source(e),
            );
        }
    }

    validator.check_links()?;
    Ok(validator)
}

/// Checks the gzip magic bytes and returns the decompressed stream.
fn gzip_stream<R: Read>(mut bundle: R) -> Result<GzDecoder<io::Chain<io::Cursor<[u8; 2]>, R>>> {
    let mut magic = [0u8; 2];
    match bundle.read_exact(&mut magic) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(Error::invalid_bundle(NOT_GZIP_TAR))
        }
        Err(e) => return Err(Error::io("cannot read the bundle", e)),
    }
    if magic != GZIP_MAGIC {
        return Err(Error::invalid_bundle(NOT_GZIP_TAR));
    }
    Ok(GzDecoder::new(io::Cursor::new(magic).chain(bundle)))
}

/// `size` rounded up to whole 512-byte tar blocks.
fn padded(size: u64) -> u64 {
    size.saturating_add(511) & !511
}

/// How many more decompressed bytes the archive may read, shared between [`read_bundle`] and
/// the [`BudgetReader`] the `tar` crate reads through.
#[derive(Default)]
struct Budget {
    remaining: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    fn grant(&self, bytes: u64) {
        self.remaining
            .set(self.remaining.get().saturating_add(bytes));
    }

    fn set(&self, bytes: u64) {
        self.remaining.set(bytes);
    }
}

/// A reader that fails once its [`Budget`] is spent.
struct BudgetReader<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for BudgetReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.budget.remaining.get();
        if remaining == 0 {
            self.budget.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tar headers larger than allowed",
            ));
        }
        let wanted = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let n = self.inner.read(&mut buf[..wanted])?;
        self.budget.remaining.set(remaining - n as u64);
        Ok(n)
    }
}

/// What a path of the bundle is, in [`Tree`].
enum NodeKind {
    /// A directory; `explicit` when it has an entry of its own rather than being implied by the
    /// paths of other entries.
    Dir { explicit: bool },
    /// A regular file.
    File,
    /// A symbolic link and its target.
    Symlink { target: String },
}

/// One path of the bundle.
struct TreeNode {
    kind: NodeKind,
    parent: usize,
    children: HashMap<String, usize>,
}

/// Every path of the bundle seen so far, as a tree of components (node 0 is the root), so that
/// duplicates, entries under links and link targets can be checked in memory proportional to
/// the paths' total length.
struct Tree {
    nodes: Vec<TreeNode>,
}

impl Tree {
    fn new() -> Self {
        Tree {
            nodes: vec![TreeNode {
                kind: NodeKind::Dir { explicit: true },
                parent: 0,
                children: HashMap::new(),
            }],
        }
    }

    fn child(&self, parent: usize, name: &str) -> Option<usize> {
        self.nodes[parent].children.get(name).copied()
    }

    fn add(&mut self, parent: usize, name: &str, kind: NodeKind) -> usize {
        let id = self.nodes.len();
        self.nodes.push(TreeNode {
            kind,
            parent,
            children: HashMap::new(),
        });
        self.nodes[parent].children.insert(name.to_owned(), id);
        id
    }

    /// Records the normalized, non-empty `path`, or says why it cannot be in the bundle.
    fn insert(&mut self, path: &str, kind: NodeKind) -> std::result::Result<usize, String> {
        let mut parent = 0;
        let mut start = 0;
        for (end, _) in path.match_indices('/') {
            let name = &path[start..end];
            parent = match self.child(parent, name) {
                None => self.add(parent, name, NodeKind::Dir { explicit: false }),
                Some(id) => match self.nodes[id].kind {
                    NodeKind::Dir { .. } => id,
                    NodeKind::Symlink { .. } => {
                        return Err(format!(
                            "goes through the symbolic link {:?} of the bundle",
                            &path[..end]
                        ))
                    }
                    NodeKind::File => {
                        return Err(format!(
                            "goes through the file {:?} of the bundle",
                            &path[..end]
                        ))
                    }
                },
            };
            start = end + 1;
        }
        let name = &path[start..];
        match self.child(parent, name) {
            None => Ok(self.add(parent, name, kind)),
            Some(id) => match (&mut self.nodes[id].kind, kind) {
                (NodeKind::Dir { explicit }, NodeKind::Dir { .. }) if !*explicit => {
                    *explicit = true;
                    Ok(id)
                }
                (NodeKind::Dir { explicit: false }, _) => {
                    Err("is not a directory, but earlier entries are inside it".to_owned())
                }
                _ => Err("is a duplicate entry (the same path appears twice)".to_owned()),
            },
        }
    }

    /// The nodes from the root (excluded) down to the parent of `id`, as the starting point of
    /// a link resolution.
    fn parents_of(&self, id: usize) -> Vec<Option<usize>> {
        let mut stack = Vec::new();
        let mut current = self.nodes[id].parent;
        while current != 0 {
            stack.push(Some(current));
            current = self.nodes[current].parent;
        }
        stack.reverse();
        stack
    }

    /// Walks `target` from `stack` the way the kernel would, following the bundle's links. The
    /// stack holds the node of each component below the root, or `None` for a component the
    /// bundle does not have (treated as a plain directory).
    fn follow(
        &self,
        target: &str,
        stack: &mut Vec<Option<usize>>,
        hops: &mut u32,
        steps: &mut u64,
    ) -> std::result::Result<(), &'static str> {
        for component in target.split('/') {
            *steps += 1;
            if *steps > MAX_LINK_STEPS {
                return Err("is one of too many nested symbolic links to check");
            }
            match component {
                "" | "." => {}
                ".." => {
                    if stack.pop().is_none() {
                        return Err("is a symbolic link that resolves outside the bundle through other symbolic links");
                    }
                }
                name => {
                    let parent = match stack.last() {
                        None => Some(0),
                        Some(parent) => *parent,
                    };
                    let child = parent.and_then(|p| self.child(p, name));
                    match child.map(|id| &self.nodes[id].kind) {
                        Some(NodeKind::Symlink { target }) => {
                            *hops += 1;
                            if *hops > MAX_LINK_HOPS {
                                return Err(
                                    "is a symbolic link in a loop or in too long a chain of links",
                                );
                            }
                            self.follow(target, stack, hops, steps)?;
                        }
                        _ => stack.push(child),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The rules every entry of a bundle must pass, and what the entries seen so far hold.
pub(super) struct Validator {
    limits: BundleLimits,
    /// How many entries were read.
    entries: u64,
    /// How many bytes of entry data the headers declared.
    data_bytes: u64,
    /// The path of the last entry read, for errors about what follows it.
    last_entry: Option<String>,
    tree: Tree,
    /// Every symbolic link: its path and its node.
    links: Vec<(String, usize)>,
    /// Every regular file: its path and size.
    pub(super) files: Vec<(String, u64)>,
}

impl Validator {
    fn new(limits: BundleLimits) -> Self {
        Validator {
            limits,
            entries: 0,
            data_bytes: 0,
            last_entry: None,
            tree: Tree::new(),
            links: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Validates one entry and records it.
    fn check<R: Read>(&mut self, entry: &tar::Entry<'_, R>) -> Result<Item> {
        let raw_path = entry.path_bytes();
        let shown = shown_path(&raw_path);
        self.last_entry = Some(shown.clone());

        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(Error::too_large(format!(
                "bundle has more than {} entries (the max_files limit); refused at entry {shown:?}",
                self.limits.max_files
            )));
        }
        let size = entry.size();
        self.data_bytes = self.data_bytes.saturating_add(size);
        if self.data_bytes > self.limits.max_total_bytes {
            return Err(Error::too_large(format!(
                "bundle holds more than {} bytes of data (the max_total_bytes limit); refused at entry {shown:?}",
                self.limits.max_total_bytes
            )));
        }

        let header = entry.header();
        let entry_type = header.entry_type();
        if entry_type == EntryType::XGlobalHeader {
            // Pax global headers carry defaults the tar crate does not apply; their names are
            // often absolute temporary paths, so they are skipped before the path rules.
            return Ok(Item::Skip);
        }
        let refuse = |why: &str| Error::invalid_bundle(format!("bundle entry {shown:?} {why}"));
        let path = normalize_entry_path(&raw_path).map_err(|why| refuse(&why))?;
        let mtime = header.mtime().unwrap_or(0);
        let mode = || {
            header
                .mode()
                .map_err(|_| refuse("has an invalid mode field"))
        };

        match entry_type {
            EntryType::Regular => {
                if path.is_empty() {
                    return Err(refuse("is a file with an empty path"));
                }
                let mode = mode()?;
                self.tree
                    .insert(&path, NodeKind::File)
                    .map_err(|why| refuse(&why))?;
                self.files.push((path.clone(), size));
                Ok(Item::File {
                    path,
                    mode,
                    size,
                    mtime,
                })
            }
            EntryType::Directory => {
                if path.is_empty() {
                    return Ok(Item::Skip);
                }
                let mode = mode()?;
                self.tree
                    .insert(&path, NodeKind::Dir { explicit: true })
                    .map_err(|why| refuse(&why))?;
                Ok(Item::Dir { path, mode, mtime })
            }
            EntryType::Symlink => {
                if path.is_empty() {
                    return Err(refuse("is a symbolic link with an empty path"));
                }
                let raw_target = entry.link_name_bytes().unwrap_or_default();
                let target = check_link_target(&path, &raw_target).map_err(|why| refuse(&why))?;
                let id = self
                    .tree
                    .insert(
                        &path,
                        NodeKind::Symlink {
                            target: target.clone(),
                        },
                    )
                    .map_err(|why| refuse(&why))?;
                self.links.push((path.clone(), id));
                Ok(Item::Symlink {
                    path,
                    target,
                    mtime,
                })
            }
            EntryType::Link => Err(refuse("is a hard link; bundles may not contain hard links")),
            EntryType::Char | EntryType::Block | EntryType::Fifo => Err(refuse(
                "is a device or FIFO; bundles may contain only files, directories and symbolic links",
            )),
            other => Err(refuse(&format!("has an unsupported entry type ({other:?})"))),
        }
    }

    /// Checks every symbolic link against the whole bundle: followed the way the kernel
    /// follows them (through the bundle's other links), each must stay inside the bundle.
    /// This catches what a lexical check cannot, such as `s -> .` with `t -> s/d/../..`.
    fn check_links(&self) -> Result<()> {
        let mut steps = 0;
        for (path, id) in &self.links {
            let NodeKind::Symlink { target } = &self.tree.nodes[*id].kind else {
                continue;
            };
            let mut stack = self.tree.parents_of(*id);
            let mut hops = 0;
            self.tree
                .follow(target, &mut stack, &mut hops, &mut steps)
                .map_err(|why| Error::invalid_bundle(format!("bundle entry {path:?} {why}")))?;
        }
        Ok(())
    }

    /// The error for a failure of the archive itself (not of one entry's rules).
    fn read_error(&self, budget: &Budget, source: io::Error) -> Error {
        if budget.exceeded.get() {
            let place = match &self.last_entry {
                Some(last) => format!("after entry {last:?}"),
                None => "in the first entry".to_owned(),
            };
            return Error::too_large(format!(
                "bundle entry headers {place} are larger than {METADATA_BUDGET} bytes"
            ));
        }
        match &self.last_entry {
            None => Error::invalid_bundle(NOT_GZIP_TAR).with_source(source),
            Some(last) => Error::invalid_bundle(format!(
                "bundle is corrupt or truncated after entry {last:?}"
            ))
            .with_source(source),
        }
    }
}

/// An entry path for messages: lossy UTF-8, cut short if very long.
fn shown_path(raw: &[u8]) -> String {
    const SHOWN: usize = 256;
    let text = String::from_utf8_lossy(raw);
    if text.chars().count() <= SHOWN {
        text.into_owned()
    } else {
        let mut cut: String = text.chars().take(SHOWN).collect();
        cut.push('…');
        cut
    }
}

/// Checks the text rules shared by entry paths and link targets: length, NUL, UTF-8 and
/// Windows forms.
fn check_path_text<'a>(raw: &'a [u8], what: &str) -> std::result::Result<&'a str, String> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(format!("has a {what} longer than {MAX_PATH_BYTES} bytes"));
    }
    if raw.contains(&0) {
        return Err(format!("has a {what} with a NUL byte"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| format!("has a {what} that is not UTF-8"))?;
    if text.contains('\\') {
        return Err(format!(
            "has a {what} with a backslash (a Windows separator)"
        ));
    }
    let bytes = text.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(format!("has a {what} with a Windows drive prefix"));
    }
    Ok(text)
}

/// Normalizes an entry path to `/`-separated components without `.` or empty ones (the root
/// itself is the empty string), refusing absolute paths and `..`.
fn normalize_entry_path(raw: &[u8]) -> std::result::Result<String, String> {
    let text = check_path_text(raw, "path")?;
    if text.starts_with('/') {
        return Err("is an absolute path".to_owned());
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("has a \"..\" component".to_owned()),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a symbolic link's target lexically: relative, and inside the bundle when resolved
/// from the link's own directory.
fn check_link_target(path: &str, raw: &[u8]) -> std::result::Result<String, String> {
    if raw.is_empty() {
        return Err("is a symbolic link with an empty target".to_owned());
    }
    let target = check_path_text(raw, "link target")?;
    if target.starts_with('/') {
        return Err(format!(
            "is a symbolic link to the absolute path {target:?}"
        ));
    }
    let mut depth = path.matches('/').count();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth == 0 {
                    return Err(format!(
                        "is a symbolic link to {target:?}, outside the bundle"
                    ));
                }
                depth -= 1;
            }
            _ => depth += 1,
        }
    }
    Ok(target.to_owned())
}
