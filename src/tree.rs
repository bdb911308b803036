//! The merged tree: layer indexes applied bottom to top by the OCI overlay rules, then frozen
//! into an arena that FUSE and export share (node id = index, inode = id + 1, root = 0).
//! See: <https://github.com/opencontainers/image-spec/blob/main/layer.md>
//!
//! The frozen arena is four flat vectors: fixed-size node records, a directory's children as a
//! contiguous run of (name, id) records sorted by name, xattr records sorted by node, and one
//! byte buffer holding every name, symlink target and xattr (plus, for sparse files only, a side
//! table of their maps' segments). That is about 80 bytes per entry
//! plus its name, against ~150 for boxed children, targets and xattrs per node, and it can be
//! saved and loaded as is (`cache/merged.rs`), which is what makes a warm mount cheap.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::error::{Error, Result};
use crate::layer::path::{join, split_parent};
use crate::layer::{Entry, Kind, LayerIndex, Meta, Segment};

/// Index of a node in the arena.
pub type NodeId = u32;
/// The root directory's id.
pub const ROOT: NodeId = 0;

/// Metadata of a directory that no layer describes (OCI leaves it to the implementation).
const IMPLICIT_DIR: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: 0,
    mtime_nsec: 0,
};

/// A symlink's mode: Linux has no symlink permissions (`lchmod` fails) and every filesystem
/// reports `lrwxrwxrwx`, so a container sees 0777 whatever the tar header says. Set once here,
/// so the mount, `ls -l` and export agree.
const SYMLINK_MODE: u32 = 0o777;

/// Most symlinks one path may pass through, as Linux's `MAXSYMLINKS`; more is taken as a loop.
const MAX_SYMLINKS: usize = 40;

/// Where a regular file's bytes are: a range of one layer's decompressed tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent<'a> {
    /// 0-based index of the layer.
    pub layer: u32,
    /// Offset in the decompressed layer tar (a sparse file's first stored byte).
    pub offset: u64,
    /// Length (a sparse file's real size).
    pub size: u64,
    /// A sparse file's data runs, stored back to back from `offset`; the rest of the file is
    /// holes, read as zeros.
    pub sparse: Option<&'a [Segment]>,
}

impl Extent<'_> {
    /// How many bytes the layer stores: `size`, less a sparse file's holes.
    pub fn stored(&self) -> u64 {
        match self.sparse {
            // Runs are back to back (checked when a tree is built or loaded).
            Some(map) => map.last().map_or(0, |l| l.tar + l.len - self.offset),
            None => self.size,
        }
    }
}

/// The type of a node, with its type-specific data (borrowed from the arena).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind<'a> {
    /// Children sorted by name bytes.
    Dir(Children<'a>),
    /// Regular file.
    File(Extent<'a>),
    /// Symlink target, raw.
    Symlink(&'a [u8]),
    /// Character device.
    Char(u32, u32),
    /// Block device.
    Block(u32, u32),
    /// Named pipe.
    Fifo,
}

/// One inode of the merged tree; hardlinked names share it. A view into the arena, cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node<'a> {
    /// Type and data.
    pub kind: NodeKind<'a>,
    /// Mode, owner, mtime.
    pub meta: Meta,
    /// xattrs, byte-exact.
    pub xattrs: Xattrs<'a>,
    /// Link count: names for files, 2 + subdirectories for directories.
    pub nlink: u32,
    /// Parent directory (the first name's, for hardlinks; the root is its own parent).
    pub parent: NodeId,
    /// 1-based layer the node came from; 0 for an implicit directory.
    pub layer: u32,
}

impl Node<'_> {
    /// Content length for files, target length for symlinks, 0 otherwise.
    pub fn size(&self) -> u64 {
        match &self.kind {
            NodeKind::File(e) => e.size,
            NodeKind::Symlink(t) => t.len() as u64,
            _ => 0,
        }
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir(_))
    }
}

/// A directory's entries, sorted by name: `(name, id)` pairs.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Children<'a> {
    recs: &'a [ChildRec],
    bytes: &'a [u8],
}

impl<'a> Children<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// True when the directory is empty.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// The `i`th entry in name order.
    pub fn get(&self, i: usize) -> Option<(&'a [u8], NodeId)> {
        self.recs.get(i).map(|r| (r.name(self.bytes), r.id))
    }

    /// The entries from position `start` on (empty past the end).
    pub fn starting_at(&self, start: usize) -> Children<'a> {
        Children {
            recs: &self.recs[start.min(self.recs.len())..],
            bytes: self.bytes,
        }
    }

    /// The entries at positions `range` (clamped to the directory's size).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Children<'a> {
        let end = range.end.min(self.recs.len());
        Children {
            recs: &self.recs[range.start.min(end)..end],
            bytes: self.bytes,
        }
    }

    /// The entries in name order.
    pub fn iter(&self) -> ChildIter<'a> {
        ChildIter {
            recs: self.recs.iter(),
            bytes: self.bytes,
        }
    }

    /// The id of the entry called `name`.
    pub fn find(&self, name: &[u8]) -> Option<NodeId> {
        self.recs
            .binary_search_by(|r| r.name(self.bytes).cmp(name))
            .ok()
            .map(|i| self.recs[i].id)
    }
}

impl<'a> IntoIterator for Children<'a> {
    type Item = (&'a [u8], NodeId);
    type IntoIter = ChildIter<'a>;

    fn into_iter(self) -> ChildIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Children<'a> {
    type Item = (&'a [u8], NodeId);
    type IntoIter = ChildIter<'a>;

    fn into_iter(self) -> ChildIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Children`].
pub struct ChildIter<'a> {
    recs: std::slice::Iter<'a, ChildRec>,
    bytes: &'a [u8],
}

impl<'a> Iterator for ChildIter<'a> {
    type Item = (&'a [u8], NodeId);

    fn next(&mut self) -> Option<Self::Item> {
        self.recs.next().map(|r| (r.name(self.bytes), r.id))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.recs.size_hint()
    }
}

impl DoubleEndedIterator for ChildIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.recs.next_back().map(|r| (r.name(self.bytes), r.id))
    }
}

impl ExactSizeIterator for ChildIter<'_> {}

impl fmt::Debug for Children<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, id)| (String::from_utf8_lossy(n), id)))
            .finish()
    }
}

/// A node's extended attributes, `(name, value)` in tar order, byte-exact.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Xattrs<'a> {
    recs: &'a [XattrRec],
    bytes: &'a [u8],
}

impl<'a> Xattrs<'a> {
    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// The `(name, value)` pairs.
    pub fn iter(&self) -> XattrIter<'a> {
        XattrIter {
            recs: self.recs.iter(),
            bytes: self.bytes,
        }
    }
}

impl<'a> IntoIterator for Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = XattrIter<'a>;

    fn into_iter(self) -> XattrIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = XattrIter<'a>;

    fn into_iter(self) -> XattrIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Xattrs`].
pub struct XattrIter<'a> {
    recs: std::slice::Iter<'a, XattrRec>,
    bytes: &'a [u8],
}

impl<'a> Iterator for XattrIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        self.recs.next().map(|r| r.pair(self.bytes))
    }
}

impl fmt::Debug for Xattrs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

// ---- the arena's records ----

/// Kind tags of [`NodeRec::tag`] (low bits).
pub(crate) const TAG_DIR: u8 = 0;
pub(crate) const TAG_FILE: u8 = 1;
pub(crate) const TAG_SYMLINK: u8 = 2;
pub(crate) const TAG_CHAR: u8 = 3;
pub(crate) const TAG_BLOCK: u8 = 4;
pub(crate) const TAG_FIFO: u8 = 5;
/// A regular file with holes: `a` is its [`MapRec`], `b` its real size.
pub(crate) const TAG_SPARSE: u8 = 6;
/// Set in [`NodeRec::tag`] when the node has xattr records, so most lookups skip the search.
pub(crate) const HAS_XATTRS: u8 = 0x80;

/// One node, 64 bytes. `a` and `b` hold the kind's data: a file's offset and size (its layer is
/// `layer - 1`), a symlink target's place in the byte buffer and its length, a directory's first
/// child record and child count, a device's major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct NodeRec {
    pub(crate) mtime: i64,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) a: u64,
    pub(crate) b: u64,
    pub(crate) mode: u32,
    pub(crate) mtime_nsec: u32,
    pub(crate) nlink: u32,
    pub(crate) parent: NodeId,
    pub(crate) layer: u32,
    pub(crate) tag: u8,
}

/// A sparse file's runs: `segments[start..start + count]`. Maps are numbered in node order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapRec {
    pub(crate) start: u64,
    pub(crate) count: u64,
}

/// One directory entry: the name's place in the byte buffer and the node it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct ChildRec {
    pub(crate) at: u64,
    pub(crate) len: u32,
    pub(crate) id: NodeId,
}

impl ChildRec {
    pub(crate) fn name<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        slice(bytes, self.at, u64::from(self.len))
    }
}

/// One xattr of node `node`: name then value, adjacent in the byte buffer from `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct XattrRec {
    pub(crate) at: u64,
    pub(crate) node: NodeId,
    pub(crate) name_len: u32,
    pub(crate) value_len: u32,
}

impl XattrRec {
    fn pair<'a>(&self, bytes: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let name = slice(bytes, self.at, u64::from(self.name_len));
        let value = slice(
            bytes,
            self.at.saturating_add(u64::from(self.name_len)),
            u64::from(self.value_len),
        );
        (name, value)
    }
}

/// `bytes[at..at + len]`, empty if out of range: ranges are checked when a tree is built or
/// loaded, so this only keeps a broken invariant from becoming a panic.
fn slice(bytes: &[u8], at: u64, len: u64) -> &[u8] {
    usize::try_from(at)
        .ok()
        .zip(usize::try_from(at.saturating_add(len)).ok())
        .and_then(|(s, e)| bytes.get(s..e))
        .unwrap_or(&[])
}

/// A name a directory entry can have: one component, not `.`/`..`, no NUL, no whiteout prefix.
fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && !name.starts_with(crate::layer::path::WHITEOUT_PREFIX)
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// One of the arena's vectors: built in memory by a merge, or a range of a mapped cache file
/// (`cache/merged.rs`), which a warm mount then uses in place instead of copying.
pub(crate) enum Store<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: std::sync::Arc<Mapping>,
        at: usize,
        len: usize,
    },
}

/// Records that may be viewed in a mapped file's bytes: `repr(C)` (or a byte), with integer
/// fields only, so every bit pattern is a value.
///
/// # Safety
/// Implement only for such types.
pub(crate) unsafe trait Pod: Copy {}
// SAFETY: `repr(C)` structs of integers, and a byte.
unsafe impl Pod for NodeRec {}
// SAFETY: as above.
unsafe impl Pod for ChildRec {}
// SAFETY: as above.
unsafe impl Pod for XattrRec {}
// SAFETY: as above.
unsafe impl Pod for u8 {}

impl<T: Pod> Store<T> {
    /// `len` records of `T` from byte `at` of `map`; `None` unless they lie inside it, aligned.
    pub(crate) fn mapped(map: &std::sync::Arc<Mapping>, at: usize, len: usize) -> Option<Self> {
        let end = len.checked_mul(size_of::<T>())?.checked_add(at)?;
        let aligned = (map.bytes().as_ptr() as usize).checked_add(at)? % align_of::<T>() == 0;
        (end <= map.bytes().len() && aligned).then(|| Store::Mapped {
            map: map.clone(),
            at,
            len,
        })
    }

    /// The records as a vector of their own, copying them out of a mapping.
    fn vec(&mut self) -> &mut Vec<T> {
        if let Store::Mapped { .. } = self {
            *self = Store::Owned(self.to_vec());
        }
        match self {
            Store::Owned(v) => v,
            Store::Mapped { .. } => unreachable!("made owned above"),
        }
    }

    pub(crate) fn push(&mut self, v: T) {
        self.vec().push(v);
    }

    pub(crate) fn extend_from_slice(&mut self, v: &[T]) {
        self.vec().extend_from_slice(v);
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.vec().clear();
    }
}

impl<T: Pod> From<Vec<T>> for Store<T> {
    fn from(v: Vec<T>) -> Self {
        Store::Owned(v)
    }
}

impl<T: Pod> std::ops::Deref for Store<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Store::Owned(v) => v,
            Store::Mapped { map, at, len } => {
                let bytes = &map.bytes()[*at..*at + *len * size_of::<T>()];
                // SAFETY: `mapped` checked that the range is inside the mapping and aligned for
                // T, and T is Pod: any bytes are valid records. The mapping lives as long as
                // `map`, which this borrow holds, and is never written (see `Mapping`).
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), *len) }
            }
        }
    }
}

impl<T: Pod> std::ops::DerefMut for Store<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.vec()
    }
}

impl<'a, T: Pod> IntoIterator for &'a Store<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Pod> Default for Store<T> {
    fn default() -> Self {
        Store::Owned(Vec::new())
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: Pod + PartialEq> PartialEq for Store<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Pod + Eq> Eq for Store<T> {}

/// A cache file's bytes, read-only: mapped from the file, or (where mapping fails, and in
/// tests) copied into an 8-byte-aligned buffer.
///
/// A mapping shows the file as it is on disk, so it is only used for files nobody writes in
/// place: flatfs writes a cache file to a temp file and renames it, and removes it by unlink,
/// neither of which touches a mapped file. (A process that wrote into one in place could change
/// what a mount serves, as it could by rewriting the image's blobs, which are read on demand;
/// every read through the tree is still bounds checked, so not beyond the arena.)
pub(crate) enum Mapping {
    Map { ptr: *mut libc::c_void, len: usize },
    Heap { words: Box<[u64]>, len: usize },
}

// SAFETY: the mapping is read-only and owned by this value; the pointer is only read through.
unsafe impl Send for Mapping {}
// SAFETY: as above: nothing writes through it.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all `len` bytes of `file`, populating the page tables at once (a warm mount reads
    /// every page to check it); a copy if mapping is refused.
    pub(crate) fn of_file(file: &std::fs::File, len: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Self::from_bytes(&[]));
        }
        // SAFETY: a fresh private read-only mapping of a file we hold open; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let mut bytes = Vec::with_capacity(len);
            std::io::Read::read_to_end(&mut std::io::Read::take(file, len as u64), &mut bytes)?;
            return Ok(Self::from_bytes(&bytes));
        }
        Ok(Mapping::Map { ptr, len })
    }

    /// A copy of `bytes`, aligned as a mapping would be.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        Mapping::Heap {
            words,
            len: bytes.len(),
        }
    }

    /// All the bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            // SAFETY: `len` bytes mapped readable at `ptr` until drop.
            Mapping::Map { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.cast::<u8>(), *len)
            },
            // SAFETY: the words hold at least `len` initialised bytes.
            Mapping::Heap { words, len } => unsafe {
                std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len)
            },
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Mapping::Map { ptr, len } = *self {
            // SAFETY: mapped in `of_file` with this length; no borrow outlives `self`.
            unsafe {
                libc::munmap(ptr, len);
            }
        }
    }
}

/// The frozen merged tree.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub(crate) nodes: Store<NodeRec>,
    pub(crate) children: Store<ChildRec>,
    pub(crate) xattrs: Store<XattrRec>,
    pub(crate) bytes: Store<u8>,
    /// Sparse files' maps, a side table so that other nodes stay 64 bytes.
    pub(crate) maps: Vec<MapRec>,
    pub(crate) segments: Vec<Segment>,
}

impl Tree {
    /// Appends to the byte buffer; returns where the bytes start.
    fn push_bytes(&mut self, b: &[u8]) -> u64 {
        let at = self.bytes.len() as u64;
        self.bytes.extend_from_slice(b);
        at
    }

    /// Number of nodes (inodes).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: there is at least the root.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node with this id; panics if the id is not from this tree.
    pub fn node(&self, id: NodeId) -> Node<'_> {
        self.get(id).expect("node ids come from this tree")
    }

    /// The node with this id, if it exists.
    pub fn get(&self, id: NodeId) -> Option<Node<'_>> {
        let r = self.nodes.get(id as usize)?;
        let kind = match r.tag & !HAS_XATTRS {
            TAG_DIR => NodeKind::Dir(self.child_range(r.a, r.b)),
            TAG_FILE => NodeKind::File(Extent {
                layer: r.layer.saturating_sub(1),
                offset: r.a,
                size: r.b,
                sparse: None,
            }),
            TAG_SPARSE => {
                let map = self.map(r.a);
                NodeKind::File(Extent {
                    layer: r.layer.saturating_sub(1),
                    offset: map.first().map_or(0, |s| s.tar),
                    size: r.b,
                    sparse: Some(map),
                })
            }
            TAG_SYMLINK => NodeKind::Symlink(slice(&self.bytes, r.a, r.b)),
            TAG_CHAR => NodeKind::Char(r.a as u32, r.b as u32),
            TAG_BLOCK => NodeKind::Block(r.a as u32, r.b as u32),
            _ => NodeKind::Fifo,
        };
        let xattrs = if r.tag & HAS_XATTRS != 0 {
            let start = self.xattrs.partition_point(|x| x.node < id);
            let end = self.xattrs.partition_point(|x| x.node <= id);
            Xattrs {
                recs: &self.xattrs[start..end],
                bytes: &self.bytes,
            }
        } else {
            Xattrs::default()
        };
        Some(Node {
            kind,
            meta: Meta {
                mode: r.mode,
                uid: r.uid,
                gid: r.gid,
                mtime: r.mtime,
                mtime_nsec: r.mtime_nsec,
            },
            xattrs,
            nlink: r.nlink,
            parent: r.parent,
            layer: r.layer,
        })
    }

    /// The runs of sparse map `index` (empty if out of range: checked on build and load).
    fn map(&self, index: u64) -> &[Segment] {
        let Some(m) = usize::try_from(index).ok().and_then(|i| self.maps.get(i)) else {
            return &[];
        };
        usize::try_from(m.start)
            .ok()
            .zip(usize::try_from(m.start.saturating_add(m.count)).ok())
            .and_then(|(s, e)| self.segments.get(s..e))
            .unwrap_or(&[])
    }

    fn child_range(&self, start: u64, count: u64) -> Children<'_> {
        let recs = usize::try_from(start)
            .ok()
            .zip(usize::try_from(start.saturating_add(count)).ok())
            .and_then(|(s, e)| self.children.get(s..e))
            .unwrap_or(&[]);
        Children {
            recs,
            bytes: &self.bytes,
        }
    }

    /// Children of a directory, sorted by name; empty for other nodes.
    pub fn children(&self, id: NodeId) -> Children<'_> {
        match self.get(id).map(|n| n.kind) {
            Some(NodeKind::Dir(c)) => c,
            _ => Children::default(),
        }
    }

    /// Looks a name up in a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children(dir).find(name)
    }

    /// Resolves a normalised path without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<NodeId> {
        let mut id = ROOT;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            id = self.lookup(id, comp)?;
        }
        Some(id)
    }

    /// Whether the arena holds together as [`Builder::freeze`] makes it, for a tree of `layers`
    /// layers read from a file: every offset and id in range, each directory's children a
    /// sorted run of single safe names right after the previous directory's, every directory
    /// named once and numbered after its parent (so walks end), link counts as names give them.
    pub(crate) fn is_valid(&self, layers: usize) -> bool {
        let n = self.nodes.len();
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let is_dir = |id: NodeId| {
            self.nodes
                .get(id as usize)
                .is_some_and(|r| r.tag & !HAS_XATTRS == TAG_DIR)
        };
        let in_bytes = |at: u64, len: u64| {
            at.checked_add(len)
                .is_some_and(|end| end <= self.bytes.len() as u64)
        };
        if n == 0 || !is_dir(ROOT) || self.nodes[0].parent != ROOT {
            return false;
        }
        let mut names = vec![0u32; n];
        let mut subdirs = vec![0u32; n];
        let mut next_child = 0u64;
        let (mut next_map, mut next_segment) = (0u64, 0u64);
        for (i, r) in self.nodes.iter().enumerate() {
            let id = i as NodeId;
            let layer_ok = r.layer as usize <= layers;
            if !layer_ok || !is_dir(r.parent) || r.tag & !(HAS_XATTRS | 7) != 0 {
                return false;
            }
            match r.tag & !HAS_XATTRS {
                TAG_DIR => {
                    if r.a != next_child {
                        return false;
                    }
                    next_child = match r.a.checked_add(r.b) {
                        Some(end) if end <= self.children.len() as u64 => end,
                        _ => return false,
                    };
                    let mut prev: Option<&[u8]> = None;
                    for c in &self.children[r.a as usize..next_child as usize] {
                        if !in_bytes(c.at, c.len.into()) || c.id == ROOT || c.id >= n32 {
                            return false;
                        }
                        let name = c.name(&self.bytes);
                        if !is_safe_name(name) || prev.is_some_and(|p| p >= name) {
                            return false;
                        }
                        prev = Some(name);
                        names[c.id as usize] += 1;
                        if is_dir(c.id) {
                            // Numbered after its parent and naming it as such: no cycles.
                            if c.id <= id || self.nodes[c.id as usize].parent != id {
                                return false;
                            }
                            subdirs[i] += 1;
                        }
                    }
                }
                // a, b: offset and size of the bytes in the layer's tar; their sum must not
                // wrap (readers add them).
                TAG_FILE if r.layer == 0 || r.a.checked_add(r.b).is_none() => return false,
                // Each map used once, in node order, its runs right after the previous map's.
                TAG_SPARSE => {
                    let Some(m) = self.maps.get(next_map as usize) else {
                        return false;
                    };
                    if r.layer == 0 || r.a != next_map || m.start != next_segment {
                        return false;
                    }
                    next_map += 1;
                    next_segment = match m.start.checked_add(m.count) {
                        Some(end) if end <= self.segments.len() as u64 => end,
                        _ => return false,
                    };
                    if !runs_are_valid(&self.segments[m.start as usize..next_segment as usize], r.b)
                    {
                        return false;
                    }
                }
                TAG_SYMLINK if !in_bytes(r.a, r.b) => return false,
                TAG_CHAR | TAG_BLOCK if r.a > u32::MAX.into() || r.b > u32::MAX.into() => {
                    return false;
                }
                TAG_FILE | TAG_SYMLINK | TAG_CHAR | TAG_BLOCK | TAG_FIFO => {}
                _ => return false,
            }
        }
        if next_child != self.children.len() as u64
            || next_map != self.maps.len() as u64
            || next_segment != self.segments.len() as u64
        {
            return false;
        }
        let links_ok = self.nodes.iter().enumerate().skip(1).all(|(i, r)| {
            if r.tag & !HAS_XATTRS == TAG_DIR {
                names[i] == 1 && r.nlink == subdirs[i].saturating_add(2)
            } else {
                names[i] >= 1 && r.nlink == names[i]
            }
        });
        if !links_ok || self.nodes[0].nlink != subdirs[0].saturating_add(2) {
            return false;
        }
        // xattrs: sorted by node, in range, and present exactly where the node says so.
        let mut has = vec![false; n];
        let mut prev = 0;
        for x in &self.xattrs {
            let len = u64::from(x.name_len) + u64::from(x.value_len);
            if x.node < prev || x.node >= n32 || !in_bytes(x.at, len) {
                return false;
            }
            prev = x.node;
            has[x.node as usize] = true;
        }
        self.nodes
            .iter()
            .zip(&has)
            .all(|(r, &has)| (r.tag & HAS_XATTRS != 0) == has)
    }

    /// Visits every name depth-first, children in name order, parents before children; `first` is
    /// true on the first name of each node (later names of a node are its hardlinks).
    pub fn walk(&self, mut visit: impl FnMut(&[u8], NodeId, bool) -> Result<()>) -> Result<()> {
        let mut seen = vec![false; self.nodes.len()];
        let mut path: Vec<u8> = Vec::new();
        // (dir, next child index, path length before this dir's name)
        let mut stack: Vec<(NodeId, usize, usize)> = vec![(ROOT, 0, 0)];
        seen[ROOT as usize] = true;
        visit(b"", ROOT, true)?;
        while let Some(top) = stack.last_mut() {
            let (dir, i, _) = *top;
            let Some((name, child)) = self.children(dir).get(i) else {
                let (_, _, len) = stack.pop().expect("stack is not empty");
                path.truncate(len);
                continue;
            };
            top.1 += 1;
            let len = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            let first = !std::mem::replace(&mut seen[child as usize], true);
            visit(&path, child, first)?;
            // A directory has one name (checked when a tree is loaded), so this cannot loop.
            if first && self.node(child).is_dir() {
                stack.push((child, 0, len));
            } else {
                path.truncate(len);
            }
        }
        Ok(())
    }
}

/// Whether a sparse file's runs are as the indexer makes them: non-empty, in order, not
/// overlapping, inside the real size `size`, and stored back to back with no sum wrapping.
fn runs_are_valid(runs: &[Segment], size: u64) -> bool {
    let mut prev_end = 0;
    let mut next_tar: Option<u64> = None;
    runs.iter().all(|s| {
        let end = s.logical.checked_add(s.len);
        let tar_end = s.tar.checked_add(s.len);
        let ok = s.len > 0
            && s.logical >= prev_end
            && end.is_some_and(|e| e <= size)
            && tar_end.is_some()
            && next_tar.is_none_or(|t| t == s.tar);
        prev_end = end.unwrap_or(u64::MAX);
        next_tar = tar_end;
        ok
    })
}

/// A regular file while layers are being applied: the size of an `Extent`, so that the sparse
/// files most images lack cost every node nothing.
struct FileData {
    layer: u32,
    /// Index in [`Builder::maps`] of a sparse file's runs, or [`NO_MAP`].
    map: u32,
    offset: u64,
    size: u64,
}

const NO_MAP: u32 = u32::MAX;

/// Nodes frozen between two returns of freed memory to the system.
const TRIM_EVERY: usize = 1 << 16;

/// Hands the heap's free pages back to the system. While the arena grows in fresh pages, the
/// builder's names, child maps and xattrs it replaces are freed in small blocks that glibc
/// keeps: without this the peak is both trees at once.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; no live allocation moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A node while layers are being applied.
struct BNode {
    kind: BKind,
    meta: Meta,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    layer: u32,
}

enum BKind {
    // Boxed names: 8 bytes less per entry than `Vec` while layers are applied.
    Dir(BTreeMap<Box<[u8]>, usize>),
    File(FileData),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

struct Builder {
    nodes: Vec<BNode>,
    /// [`Builder::walk_dirs`]'s stack of directories, kept so that walks do not allocate.
    walk_scratch: Vec<usize>,
    /// Sparse files' runs, by [`FileData::map`].
    maps: Vec<Box<[Segment]>>,
    /// Names per node, kept only for [`Merger`] (inspect's account of what each layer removes).
    names: Option<Names>,
}

/// How many directory entries name each node, and the nodes whose last name went.
#[derive(Default)]
struct Names {
    count: Vec<u32>,
    unnamed: Vec<usize>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            nodes: vec![BNode {
                kind: BKind::Dir(BTreeMap::new()),
                meta: IMPLICIT_DIR,
                xattrs: Vec::new(),
                layer: 0,
            }],
            walk_scratch: Vec::new(),
            maps: Vec::new(),
            names: None,
        }
    }

    /// Notes a directory entry now naming `id` and, if it replaced one, the node it named.
    fn renamed(&mut self, id: usize, old: Option<usize>) {
        let Some(names) = &mut self.names else { return };
        if names.count.len() <= id {
            names.count.resize(id + 1, 0);
        }
        names.count[id] += 1;
        if let Some(old) = old {
            self.unnamed(old);
        }
    }

    /// Notes a directory entry naming `id` gone.
    fn unnamed(&mut self, id: usize) {
        let Some(names) = &mut self.names else { return };
        if let Some(count) = names.count.get_mut(id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                names.unnamed.push(id);
            }
        }
    }

    fn dir_children(&mut self, id: usize) -> Option<&mut BTreeMap<Box<[u8]>, usize>> {
        match &mut self.nodes[id].kind {
            BKind::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Finds a path without following symlinks: `(parent, node)`, or `None` if a component is
    /// missing or not a directory.
    fn find(&self, path: &[u8]) -> Option<(usize, usize)> {
        let (mut parent, mut id) = (0, 0);
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let BKind::Dir(children) = &self.nodes[id].kind else {
                return None;
            };
            parent = id;
            id = *children.get(comp)?;
        }
        Some((parent, id))
    }

    /// `.wh.NAME`: unlink NAME (and so everything below it) if it exists as a real path.
    fn whiteout(&mut self, path: &[u8]) {
        if let Some((parent, id)) = self.find(path)
            && id != 0
        {
            let (_, name) = split_parent(path);
            let old = self
                .dir_children(parent)
                .expect("parent is a directory")
                .remove(name);
            if let Some(old) = old {
                self.unnamed(old);
            }
        }
    }

    /// `.wh..wh..opq`: empty the directory if it exists as a real directory.
    fn opaque(&mut self, path: &[u8]) {
        let tracking = self.names.is_some();
        if let Some((_, id)) = self.find(path)
            && let Some(children) = self.dir_children(id)
        {
            if tracking {
                let old: Vec<usize> = std::mem::take(children).into_values().collect();
                for old in old {
                    self.unnamed(old);
                }
            } else {
                children.clear();
            }
        }
    }

    /// Walks from the root through the directories `dirs` names as a chrooted extraction of
    /// layer `layer` would, and returns the directory it ends in. Symlinks that this layer has
    /// created so far (in tar order) are followed, clamped to the root: `..` at the root stays
    /// there and an absolute target starts from it. Lower layers' symlinks are not followed:
    /// an overlay snapshotter extracts a layer into a directory of its own, where they do not
    /// exist. With `create`, a missing component, or one that is anything else, becomes an
    /// implicit directory (replacing what was there); without, it ends the walk with `None`.
    fn walk_dirs(
        &mut self,
        dirs: &[u8],
        layer: u32,
        create: bool,
    ) -> std::result::Result<Option<usize>, String> {
        // The directories from the root down to where the walk is (`..` pops them), reused
        // across calls; the components of followed symlinks' targets still to walk, last
        // first, before the rest of `dirs`. Most paths go through no symlink, so they cost
        // no allocation.
        let mut at = std::mem::take(&mut self.walk_scratch);
        at.clear();
        at.push(0);
        let mut rest = dirs.split(|&b| b == b'/');
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut followed = 0;
        let result = loop {
            let comp: std::borrow::Cow<[u8]> = match pending.pop() {
                Some(c) => c.into(),
                None => match rest.next() {
                    Some(c) => c.into(),
                    None => break Ok(Some(*at.last().expect("the root is never popped"))),
                },
            };
            match &comp[..] {
                b"" | b"." => continue,
                b".." => {
                    if at.len() > 1 {
                        at.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let dir = *at.last().expect("the root is never popped");
            let existing = self
                .dir_children(dir)
                .expect("walk stays on directories")
                .get(&comp[..])
                .copied();
            if let Some(child) = existing {
                match &self.nodes[child].kind {
                    BKind::Dir(_) => {
                        at.push(child);
                        continue;
                    }
                    // An empty target names nothing (Linux refuses to create one).
                    BKind::Symlink(target)
                        if self.nodes[child].layer == layer && !target.is_empty() =>
                    {
                        followed += 1;
                        if followed > MAX_SYMLINKS {
                            break Err(format!(
                                "too many levels of symbolic links in its path (more than \
                                 {MAX_SYMLINKS}, as Linux allows): a symlink loop"
                            ));
                        }
                        // Linux follows no target longer than PATH_MAX (it cannot even make
                        // one), and a longer one, followed up to 40 times, would let a few MB
                        // of layer ask for gigabytes of pending components.
                        if target.len() > crate::layer::path::MAX_PATH {
                            break Err(format!(
                                "a symlink in its path has a target longer than {} bytes \
                                 (PATH_MAX)",
                                crate::layer::path::MAX_PATH
                            ));
                        }
                        if target.starts_with(b"/") {
                            at.truncate(1);
                        }
                        pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                        continue;
                    }
                    _ => {}
                }
            }
            if !create {
                break Ok(None);
            }
            let child = self.push(BNode {
                kind: BKind::Dir(BTreeMap::new()),
                meta: IMPLICIT_DIR,
                xattrs: Vec::new(),
                layer,
            });
            let old = self
                .dir_children(dir)
                .expect("directory")
                .insert(Box::from(&comp[..]), child);
            self.renamed(child, old);
            at.push(child);
        };
        self.walk_scratch = at;
        result
    }

    fn push(&mut self, node: BNode) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Applies one layer, consuming its index so that its memory goes as the tree grows.
    fn apply(&mut self, layer_no: u32, index: LayerIndex) -> Result<()> {
        // Whiteouts and opaque markers hide lower layers only, so they go first, whatever their
        // place in the tar.
        for path in &index.opaques {
            self.opaque(path);
        }
        for path in &index.whiteouts {
            self.whiteout(path);
        }
        // Taken from the back of the reversed list, whose buffer shrinks as it empties: the
        // index's memory goes as the tree's grows, not when the layer is done, which lowers
        // the peak of a big layer by most of the index's size.
        let mut entries = index.entries;
        entries.reverse();
        while let Some(entry) = entries.pop() {
            if entries.len() < entries.capacity() / 4 * 3 {
                entries.shrink_to_fit();
            }
            let path = String::from_utf8_lossy(&entry.path).into_owned();
            self.insert(layer_no, entry).map_err(|msg| Error::Entry {
                layer: index.label.clone(),
                entry: path,
                msg,
            })?;
        }
        Ok(())
    }

    fn insert(&mut self, layer_no: u32, entry: Entry) -> std::result::Result<(), String> {
        if entry.path.is_empty() {
            // The root: only its metadata can change.
            let root = &mut self.nodes[0];
            root.meta = entry.meta;
            root.xattrs = entry.xattrs;
            root.layer = layer_no;
            return Ok(());
        }
        let (parent_path, name) = split_parent(&entry.path);
        let parent = self
            .walk_dirs(parent_path, layer_no, true)?
            .expect("a creating walk always ends in a directory");
        let existing = self
            .dir_children(parent)
            .expect("directory")
            .get(name)
            .copied();
        let kind = match entry.kind {
            Kind::Dir => {
                if let Some(id) =
                    existing.filter(|&id| matches!(self.nodes[id].kind, BKind::Dir(_)))
                {
                    // Directory over directory: metadata from above, children merge.
                    let node = &mut self.nodes[id];
                    node.meta = entry.meta;
                    node.xattrs = entry.xattrs;
                    node.layer = layer_no;
                    return Ok(());
                }
                BKind::Dir(BTreeMap::new())
            }
            Kind::Hardlink(target) => {
                // `link()` resolves the target's parents as the entry's are, not its last
                // component: a link to a symlink is a second name of the symlink.
                let (target_dir, target_name) = split_parent(&target);
                let found = if target.is_empty() {
                    Some(0)
                } else {
                    self.walk_dirs(target_dir, layer_no, false)?
                        .and_then(|d| self.dir_children(d)?.get(target_name).copied())
                };
                let id = found.ok_or_else(|| {
                    format!(
                        "hardlink target {:?} does not exist",
                        String::from_utf8_lossy(&target)
                    )
                })?;
                if matches!(self.nodes[id].kind, BKind::Dir(_)) {
                    return Err(format!(
                        "hardlink target {:?} is a directory",
                        String::from_utf8_lossy(&target)
                    ));
                }
                let old = self
                    .dir_children(parent)
                    .expect("directory")
                    .insert(name.into(), id);
                self.renamed(id, old);
                return Ok(());
            }
            Kind::File => BKind::File(FileData {
                layer: layer_no - 1,
                map: match entry.sparse {
                    Some(runs) => {
                        self.maps.push(runs);
                        u32::try_from(self.maps.len() - 1)
                            .ok()
                            .filter(|&i| i != NO_MAP)
                            .ok_or("too many sparse files")?
                    }
                    None => NO_MAP,
                },
                offset: entry.offset,
                size: entry.size,
            }),
            Kind::Symlink(t) => BKind::Symlink(t),
            Kind::Char(a, b) => BKind::Char(a, b),
            Kind::Block(a, b) => BKind::Block(a, b),
            Kind::Fifo => BKind::Fifo,
        };
        let mut meta = entry.meta;
        if matches!(kind, BKind::Symlink(_)) {
            meta.mode = SYMLINK_MODE;
        }
        let id = self.push(BNode {
            kind,
            meta,
            xattrs: entry.xattrs,
            layer: layer_no,
        });
        let old = self
            .dir_children(parent)
            .expect("directory")
            .insert(name.into(), id);
        self.renamed(id, old);
        Ok(())
    }

    /// Numbers reachable nodes depth-first in name order and builds the frozen arena.
    fn freeze(self) -> Tree {
        let mut new_id: Vec<Option<NodeId>> = vec![None; self.nodes.len()];
        let mut order: Vec<(usize, NodeId)> = Vec::new(); // (old id, parent new id)
        let mut nlink: Vec<u32> = Vec::new();
        // Sizes of the arena's vectors, so each is allocated once at its final size.
        let (mut edges, mut xattrs, mut bytes) = (0usize, 0usize, 0usize);
        let (mut maps, mut segments) = (0usize, 0usize);
        new_id[0] = Some(ROOT);
        order.push((0, ROOT));
        nlink.push(0);
        // Explicit stack: paths can be thousands of components deep.
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(0, self.child_ids_rev(0))];
        while let Some((dir, pending)) = stack.last_mut() {
            let Some(child) = pending.pop() else {
                stack.pop();
                continue;
            };
            let parent_new = new_id[*dir].expect("visited");
            match new_id[child] {
                Some(id) => nlink[id as usize] += 1,
                None => {
                    let id = order.len() as NodeId;
                    new_id[child] = Some(id);
                    order.push((child, parent_new));
                    let is_dir = matches!(self.nodes[child].kind, BKind::Dir(_));
                    // A directory's count is 2 + subdirectories, added below; a file counts names.
                    nlink.push(if is_dir { 0 } else { 1 });
                    if is_dir {
                        nlink[parent_new as usize] += 1;
                        let ids = self.child_ids_rev(child);
                        stack.push((child, ids));
                    }
                }
            }
        }
        for &(old, _) in &order {
            let b = &self.nodes[old];
            match &b.kind {
                BKind::Dir(children) => {
                    edges += children.len();
                    bytes += children.keys().map(|k| k.len()).sum::<usize>();
                }
                BKind::Symlink(t) => bytes += t.len(),
                BKind::File(f) if f.map != NO_MAP => {
                    maps += 1;
                    segments += self.maps[f.map as usize].len();
                }
                _ => {}
            }
            xattrs += b.xattrs.len();
            bytes += b
                .xattrs
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        }
        let mut tree = Tree {
            nodes: Vec::with_capacity(order.len()).into(),
            children: Vec::with_capacity(edges).into(),
            xattrs: Vec::with_capacity(xattrs).into(),
            bytes: Vec::with_capacity(bytes).into(),
            maps: Vec::with_capacity(maps),
            segments: Vec::with_capacity(segments),
        };
        let mut old_nodes: Vec<Option<BNode>> = self.nodes.into_iter().map(Some).collect();
        let mut sparse_maps = self.maps;
        for (i, &(old, parent)) in order.iter().enumerate() {
            let id = i as NodeId;
            // Taken, so each builder node's memory goes as its frozen record comes.
            let b = old_nodes[old].take().expect("each node is numbered once");
            if i % TRIM_EVERY == TRIM_EVERY - 1 {
                give_back_freed_memory();
            }
            let (mut tag, a, len) = match b.kind {
                BKind::Dir(children) => {
                    let first = tree.children.len() as u64;
                    for (name, c) in &children {
                        let at = tree.push_bytes(name);
                        tree.children.push(ChildRec {
                            at,
                            len: name.len() as u32,
                            id: new_id[*c].expect("reachable"),
                        });
                    }
                    (TAG_DIR, first, children.len() as u64)
                }
                BKind::File(f) if f.map != NO_MAP => {
                    // Taken, as the nodes are: its memory goes as the arena's grows.
                    let runs = std::mem::take(&mut sparse_maps[f.map as usize]);
                    tree.maps.push(MapRec {
                        start: tree.segments.len() as u64,
                        count: runs.len() as u64,
                    });
                    tree.segments.extend_from_slice(&runs);
                    (TAG_SPARSE, tree.maps.len() as u64 - 1, f.size)
                }
                BKind::File(e) => (TAG_FILE, e.offset, e.size),
                BKind::Symlink(t) => (TAG_SYMLINK, tree.push_bytes(&t), t.len() as u64),
                BKind::Char(x, y) => (TAG_CHAR, x.into(), y.into()),
                BKind::Block(x, y) => (TAG_BLOCK, x.into(), y.into()),
                BKind::Fifo => (TAG_FIFO, 0, 0),
            };
            for (k, v) in &b.xattrs {
                let at = tree.push_bytes(k);
                tree.push_bytes(v);
                tree.xattrs.push(XattrRec {
                    at,
                    node: id,
                    name_len: k.len() as u32,
                    value_len: v.len() as u32,
                });
                tag |= HAS_XATTRS;
            }
            tree.nodes.push(NodeRec {
                mtime: b.meta.mtime,
                uid: b.meta.uid,
                gid: b.meta.gid,
                a,
                b: len,
                mode: b.meta.mode,
                mtime_nsec: b.meta.mtime_nsec,
                nlink: if tag & !HAS_XATTRS == TAG_DIR {
                    nlink[i] + 2
                } else {
                    nlink[i]
                },
                parent,
                layer: b.layer,
                tag,
            });
        }
        tree
    }

    fn child_ids_rev(&self, id: usize) -> Vec<usize> {
        match &self.nodes[id].kind {
            BKind::Dir(c) => c.values().rev().copied().collect(),
            _ => Vec::new(),
        }
    }
}

/// Merges layer indexes, bottom layer first, into the frozen tree.
pub fn merge(layers: &[LayerIndex]) -> Result<Tree> {
    let mut merger = Merger::new();
    for index in layers {
        merger.apply(index)?;
    }
    Ok(merger.finish())
}

/// [`merge`], consuming the indexes: each layer's index is freed once applied, which lowers the
/// peak memory of opening a big image.
pub fn merge_owned(layers: Vec<LayerIndex>) -> Result<Tree> {
    let mut builder = Builder::new();
    for (i, index) in layers.into_iter().enumerate() {
        builder.apply(i as u32 + 1, index)?;
    }
    Ok(builder.freeze())
}

/// A merge in progress, for consumers that look at the tree between layers (inspect).
pub struct Merger {
    builder: Builder,
    layers: u32,
}

impl Default for Merger {
    fn default() -> Self {
        Self::new()
    }
}

impl Merger {
    /// An empty tree: just the root.
    pub fn new() -> Self {
        let mut builder = Builder::new();
        builder.names = Some(Names::default());
        Merger { builder, layers: 0 }
    }

    /// Applies the next layer up; returns the bytes of the regular files it left without a name
    /// (content identity: a hardlinked file counts once, and only when its last name goes). The
    /// cost is that of the layer and of what it removes, not of the tree.
    pub fn apply(&mut self, index: &LayerIndex) -> Result<u64> {
        self.layers += 1;
        let before = self.builder.nodes.len();
        self.builder.apply(self.layers, index.clone())?;
        let Builder { nodes, names, .. } = &mut self.builder;
        let names = names.as_mut().expect("a merger counts names");
        let mut removed = 0;
        // A directory that lost its last name takes its children's names with it.
        while let Some(id) = names.unnamed.pop() {
            if names.count.get(id).is_some_and(|&c| c > 0) {
                continue; // named again since (a new name made in the same layer)
            }
            match &nodes[id].kind {
                BKind::Dir(children) => {
                    for &child in children.values() {
                        if let Some(count) = names.count.get_mut(child) {
                            *count = count.saturating_sub(1);
                            if *count == 0 {
                                names.unnamed.push(child);
                            }
                        }
                    }
                }
                // Files this layer added and replaced were never visible below it.
                BKind::File(e) if id < before => removed += e.size,
                _ => {}
            }
        }
        Ok(removed)
    }

    /// Whether a path exists now (looked up without following symlinks).
    pub fn exists(&self, path: &[u8]) -> bool {
        self.builder.find(path).is_some()
    }

    /// Regular-file bytes under a path (the path itself if it is a file), counting each node once.
    pub fn bytes_under(&self, path: &[u8]) -> u64 {
        let Some((_, id)) = self.builder.find(path) else {
            return 0;
        };
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![id];
        let mut total = 0;
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            match &self.builder.nodes[id].kind {
                BKind::Dir(children) => stack.extend(children.values().copied()),
                BKind::File(e) => total += e.size,
                _ => {}
            }
        }
        total
    }

    /// Every reachable regular file's content, `(layer, offset) -> size`: content identity, so
    /// hardlinked names count once.
    pub fn file_extents(&self) -> HashMap<(u32, u64), u64> {
        let mut out = HashMap::new();
        let mut stack = vec![0usize];
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            match &self.builder.nodes[id].kind {
                BKind::Dir(children) => stack.extend(children.values().copied()),
                BKind::File(e) => {
                    out.insert((e.layer, e.offset), e.size);
                }
                _ => {}
            }
        }
        out
    }

    /// Freezes the tree.
    pub fn finish(self) -> Tree {
        self.builder.freeze()
    }
}

/// A one-line-per-name listing of a tree, for tests and debugging:
/// `path type mode uid:gid size|target|dev [layer:offset] [=> first name]`.
pub fn listing(tree: &Tree) -> String {
    let mut out = String::new();
    let mut first_name: Vec<Option<Vec<u8>>> = vec![None; tree.len()];
    tree.walk(|path, id, first| {
        let n = tree.node(id);
        let p = if path.is_empty() {
            ".".to_string()
        } else {
            String::from_utf8_lossy(path).into_owned()
        };
        let detail = match &n.kind {
            NodeKind::Dir(_) => "d".to_string(),
            NodeKind::File(e) => format!("f {}@{}:{}", e.size, e.layer + 1, e.offset),
            NodeKind::Symlink(t) => format!("l {}", String::from_utf8_lossy(t)),
            NodeKind::Char(a, b) => format!("c {a},{b}"),
            NodeKind::Block(a, b) => format!("b {a},{b}"),
            NodeKind::Fifo => "p".to_string(),
        };
        out.push_str(&format!(
            "{p} {detail} {:04o} {}:{} n{}",
            n.meta.mode, n.meta.uid, n.meta.gid, n.nlink
        ));
        if first {
            first_name[id as usize] = Some(path.to_vec());
        } else if let Some(f) = &first_name[id as usize] {
            out.push_str(&format!(" => {}", String::from_utf8_lossy(f)));
        }
        out.push('\n');
        Ok(())
    })
    .expect("listing never fails");
    out
}

/// Joins a parent path and a child name (re-exported for consumers that build paths).
pub fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    join(parent, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::path::{Class, classify};

    /// A layer from lines: `f PATH [MODE]`, `d PATH [MODE]`, `l PATH TARGET`, `h PATH TARGET`,
    /// `c PATH`, `p PATH`, and raw whiteout/opaque names like `d/.wh.x`, classified as the
    /// indexer does. Files get offset = line number so the listing shows which entry won.
    fn layer(n: usize, lines: &[&str]) -> LayerIndex {
        let mut index = LayerIndex {
            label: format!("{n}"),
            ..LayerIndex::default()
        };
        for (i, line) in lines.iter().enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            // A single token is a raw whiteout or opaque marker name.
            let raw = parts[parts.len().min(2) - 1];
            let path = match classify(raw.as_bytes()).expect("valid test path") {
                Class::Entry(p) => p,
                Class::Whiteout(p) => {
                    index.whiteouts.push(p);
                    continue;
                }
                Class::Opaque(p) => {
                    index.opaques.push(p);
                    continue;
                }
                Class::Skip => continue,
            };
            let arg = parts.get(2).copied().unwrap_or("");
            let mode =
                u32::from_str_radix(if arg.is_empty() { "644" } else { arg }, 8).unwrap_or(0o644);
            let kind = match parts[0] {
                "f" => Kind::File,
                "d" => Kind::Dir,
                "l" => Kind::Symlink(arg.as_bytes().to_vec()),
                "h" => Kind::Hardlink(arg.as_bytes().to_vec()),
                "c" => Kind::Char(1, 3),
                "p" => Kind::Fifo,
                other => panic!("bad test line kind {other}"),
            };
            index.entries.push(Entry {
                path,
                meta: Meta {
                    mode: if matches!(kind, Kind::File | Kind::Dir) {
                        mode
                    } else {
                        0o777
                    },
                    ..Meta::default()
                },
                size: if kind == Kind::File { 1 } else { 0 },
                kind,
                offset: i as u64,
                xattrs: Vec::new(),
                sparse: None,
            });
        }
        index
    }

    fn merged(layers: &[&[&str]]) -> String {
        let indexes: Vec<LayerIndex> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| layer(i + 1, l))
            .collect();
        listing(&merge(&indexes).expect("merge succeeds"))
    }

    fn assert_tree(layers: &[&[&str]], expected: &str) {
        let got = merged(layers);
        let want: String = expected
            .lines()
            .map(|l| format!("{}\n", l.trim()))
            .filter(|l| l != "\n")
            .collect();
        assert_eq!(got, want, "\n--- got ---\n{got}--- want ---\n{want}");
    }

    #[test]
    fn whiteout_hides_lower_only_whatever_the_tar_order() {
        // Layer 2 writes the whiteout after its own `a`, layer 3 before: `a` survives both.
        assert_tree(
            &[
                &["f a", "f b"],
                &["f a", ".wh.a", ".wh.b"],
                &[".wh.a", "f a"],
            ],
            ". d 0755 0:0 n2
             a f 1@3:1 0644 0:0 n1",
        );
    }

    #[test]
    fn opaque_dir_hides_lower_children_before_or_after_its_entries() {
        assert_tree(
            &[
                &["d d 755", "f d/x", "f d/y"],
                &["f d/new", "d/.wh..wh..opq"],
                &["d/.wh..wh..opq", "f d/z"],
            ],
            ". d 0755 0:0 n3
             d d 0755 0:0 n2
             d/z f 1@3:1 0644 0:0 n1",
        );
    }

    #[test]
    fn whiteout_of_dir_hides_children_and_recreated_dir_is_empty() {
        assert_tree(
            &[&["d d 700", "f d/x"], &[".wh.d"], &["d d 755"]],
            ". d 0755 0:0 n3
             d d 0755 0:0 n2",
        );
    }

    #[test]
    fn dir_over_dir_merges_and_takes_upper_metadata() {
        assert_tree(
            &[&["d d 700", "f d/x"], &["d d 755", "f d/y"]],
            ". d 0755 0:0 n3
             d d 0755 0:0 n2
             d/x f 1@1:1 0644 0:0 n1
             d/y f 1@2:1 0644 0:0 n1",
        );
    }

    #[test]
    fn file_replaced_by_dir_and_dir_by_symlink() {
        assert_tree(
            &[&["f a", "d b", "f b/x"], &["d a", "f a/y", "l b /etc"]],
            ". d 0755 0:0 n3
             a d 0644 0:0 n2
             a/y f 1@2:1 0644 0:0 n1
             b l /etc 0777 0:0 n1",
        );
    }

    #[test]
    fn implicit_parent_keeps_lower_metadata_or_defaults() {
        assert_tree(
            &[&["d d 700"], &["f d/x", "f new/y"]],
            ". d 0755 0:0 n4
             d d 0700 0:0 n2
             d/x f 1@2:0 0644 0:0 n1
             new d 0755 0:0 n2
             new/y f 1@2:1 0644 0:0 n1",
        );
    }

    #[test]
    fn entry_through_lower_symlink_replaces_it_with_a_directory() {
        assert_tree(
            &[
                &["d etc", "f etc/passwd", "l lib /etc"],
                &["f lib/passwd", "lib/.wh.x"],
            ],
            ". d 0755 0:0 n4
             etc d 0644 0:0 n2
             etc/passwd f 1@1:1 0644 0:0 n1
             lib d 0755 0:0 n2
             lib/passwd f 1@2:0 0644 0:0 n1",
        );
    }

    #[test]
    fn entry_through_same_layer_symlink_lands_where_it_points_clamped_to_the_root() {
        // buildah's test image: `symldir1 -> ..` then `symldir1/etc/myfile`.
        assert_tree(
            &[&["l symldir1 ..", "f symldir1/etc/myfile"]],
            ". d 0755 0:0 n3
             etc d 0755 0:0 n2
             etc/myfile f 1@1:1 0644 0:0 n1
             symldir1 l .. 0777 0:0 n1",
        );
        assert_tree(
            &[&[
                "d sub",
                "l sub/up ../../..",
                "f sub/up/top",
                "l abs /",
                "f abs/x",
            ]],
            ". d 0755 0:0 n3
             abs l / 0777 0:0 n1
             sub d 0644 0:0 n2
             sub/up l ../../.. 0777 0:0 n1
             top f 1@1:2 0644 0:0 n1
             x f 1@1:4 0644 0:0 n1",
        );
    }

    #[test]
    fn symlink_chains_resolve_and_missing_targets_become_directories() {
        assert_tree(
            &[&[
                "l a b",
                "l b c/d",
                "d c",
                "f a/x",
                "l dangling e/f",
                "f dangling/y",
            ]],
            ". d 0755 0:0 n4
             a l b 0777 0:0 n1
             b l c/d 0777 0:0 n1
             c d 0644 0:0 n3
             c/d d 0755 0:0 n2
             c/d/x f 1@1:3 0644 0:0 n1
             dangling l e/f 0777 0:0 n1
             e d 0755 0:0 n3
             e/f d 0755 0:0 n2
             e/f/y f 1@1:5 0644 0:0 n1",
        );
    }

    #[test]
    fn same_layer_symlink_counts_only_from_where_the_tar_puts_it() {
        // The entry comes first and makes a directory; the symlink then replaces it, as an
        // extraction in tar order does. A directory over the symlink is a plain directory.
        assert_tree(
            &[&["f s/x", "l s /etc", "l t /etc", "d t", "f t/y"]],
            ". d 0755 0:0 n3
             s l /etc 0777 0:0 n1
             t d 0644 0:0 n2
             t/y f 1@1:4 0644 0:0 n1",
        );
    }

    #[test]
    fn same_layer_symlink_to_a_file_is_replaced_like_any_file() {
        // A chrooted extraction (and umoci) fails with ENOTDIR; flatfs applies rule 2 to the
        // file it reaches, as for an entry under any file.
        assert_tree(
            &[&["f file", "l s file", "f s/x"]],
            ". d 0755 0:0 n3
             file d 0755 0:0 n2
             file/x f 1@1:2 0644 0:0 n1
             s l file 0777 0:0 n1",
        );
    }

    #[test]
    fn lower_symlink_is_not_followed_even_from_a_same_layer_one() {
        assert_tree(
            &[&["d etc", "l lib /etc"], &["l l /lib/x", "f l/f"]],
            ". d 0755 0:0 n4
             etc d 0644 0:0 n2
             l l /lib/x 0777 0:0 n1
             lib d 0755 0:0 n3
             lib/x d 0755 0:0 n2
             lib/x/f f 1@2:1 0644 0:0 n1",
        );
    }

    #[test]
    fn hardlink_target_resolves_through_same_layer_symlinks_only() {
        assert_tree(
            &[&["f real/f", "l s real", "h link s/f"]],
            ". d 0755 0:0 n3
             link f 1@1:0 0644 0:0 n2
             real d 0755 0:0 n2
             real/f f 1@1:0 0644 0:0 n2 => link
             s l real 0777 0:0 n1",
        );
        let err = merge(&[
            layer(1, &["f real/f", "l s real"]),
            layer(2, &["h link s/f"]),
        ])
        .expect_err("a lower symlink is not followed");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn symlink_loop_is_an_error_naming_layer_and_entry() {
        let deep = format!("f {}/f", ["a"; 41].join("/"));
        for lines in [
            &["l a b", "l b a", "f a/x"][..],
            &["l a .", &deep],
            &["f t", "l a b", "l b a", "h x a/t"],
        ] {
            let err = merge(&[layer(1, lines)]).expect_err("loop");
            let msg = err.to_string();
            assert!(
                msg.contains("layer 1") && msg.contains("symbolic links"),
                "{msg}"
            );
        }
        // 40 symlinks are still fine, as for Linux.
        let path = ["a"; 40].join("/");
        let ok = merge(&[layer(1, &["l a .", &format!("f {path}/f")])]).expect("40 links");
        assert!(ok.resolve(b"f").is_some());
    }

    #[test]
    fn a_symlink_target_over_path_max_is_not_followed() {
        // Followed 40 times, a target of many components would pile up gigabytes of them.
        let long = format!("l a {}", "a/".repeat(crate::layer::path::MAX_PATH / 2 + 1));
        let err = merge(&[layer(1, &[&long, "f a/x"])]).expect_err("too long");
        assert!(err.to_string().contains("PATH_MAX"), "{err}");
        let at_limit = format!("l a {}", "a/".repeat(crate::layer::path::MAX_PATH / 2));
        let ok = merge(&[layer(1, &[&at_limit, "f x"])]).expect("not in any path");
        assert!(ok.resolve(b"a").is_some());
    }

    #[test]
    fn whiteout_under_same_layer_symlink_changes_nothing() {
        // Whiteouts go before the layer's entries, so its symlinks do not exist yet: the
        // whiteout names `s/foo` literally (podman shows the same when the whiteout comes
        // first in the tar; umoci follows the symlink, podman fails when it comes second).
        assert_tree(
            &[&["d etc", "f etc/foo"], &["l s /etc", "s/.wh.foo"]],
            ". d 0755 0:0 n3
             etc d 0644 0:0 n2
             etc/foo f 1@1:1 0644 0:0 n1
             s l /etc 0777 0:0 n1",
        );
    }

    #[test]
    fn whiteout_under_lower_symlink_changes_nothing() {
        assert_tree(
            &[
                &["d etc", "f etc/passwd", "l lib etc"],
                &["lib/.wh.passwd", "lib/.wh..wh..opq"],
            ],
            ". d 0755 0:0 n3
             etc d 0644 0:0 n2
             etc/passwd f 1@1:1 0644 0:0 n1
             lib l etc 0777 0:0 n1",
        );
    }

    #[test]
    fn merger_counts_removed_files_as_comparing_the_tree_before_and_after_does() {
        // Whiteouts of files and directories, opaque markers, replacement of a directory by a
        // file and of a file by an implicit directory, hardlinks losing one name then the
        // last, and a file added then replaced within one layer.
        let layers: &[&[&str]] = &[
            &[
                "f a", "h b a", "d d", "f d/x", "f d/y", "h d/l a", "d e", "f e/z", "f g",
            ],
            &[".wh.a", "f q", "f q"],
            &["d/.wh..wh..opq", "f d/n", "f g/sub"],
            &["f b", ".wh.e"],
            &["f d", "f e/new"],
            &["f d/l"],
        ];
        let mut merger = Merger::new();
        let mut removals = Vec::new();
        for (i, lines) in layers.iter().enumerate() {
            let before = merger.file_extents();
            let removed = merger.apply(&layer(i + 1, lines)).expect("merge");
            let after = merger.file_extents();
            let expected: u64 = before
                .iter()
                .filter(|(k, _)| !after.contains_key(k))
                .map(|(_, s)| s)
                .sum();
            assert_eq!(removed, expected, "layer {}", i + 1);
            removals.push(removed);
        }
        // Files are 1 byte each. 3: d/x, d/y, g (d/l is a name of a, which b still names);
        // 4: a's node with its last name b, and e/z; 5: d/n with d; 6: the file d.
        assert_eq!(removals, [0, 0, 3, 2, 1, 1]);
    }

    #[test]
    fn hardlink_survives_whiteout_of_its_target() {
        assert_tree(
            &[&["f a", "h b a", "h c a"], &[".wh.a"]],
            ". d 0755 0:0 n2
             b f 1@1:0 0644 0:0 n2
             c f 1@1:0 0644 0:0 n2 => b",
        );
    }

    #[test]
    fn hardlink_keeps_old_content_when_its_name_source_is_overwritten() {
        assert_tree(
            &[&["f a", "h b a"], &["f a"]],
            ". d 0755 0:0 n2
             a f 1@2:0 0644 0:0 n1
             b f 1@1:0 0644 0:0 n1",
        );
    }

    #[test]
    fn hardlink_name_overwritten_later_leaves_target_alone() {
        assert_tree(
            &[&["f a", "h b a"], &["f b"]],
            ". d 0755 0:0 n2
             a f 1@1:0 0644 0:0 n1
             b f 1@2:0 0644 0:0 n1",
        );
    }

    #[test]
    fn hardlink_to_lower_layer_and_to_symlink() {
        assert_tree(
            &[&["f a", "l s a"], &["h b a", "h t s"]],
            ". d 0755 0:0 n2
             a f 1@1:0 0644 0:0 n2
             b f 1@1:0 0644 0:0 n2 => a
             s l a 0777 0:0 n2
             t l a 0777 0:0 n2 => s",
        );
    }

    #[test]
    fn symlink_mode_is_0777_whatever_the_header_says() {
        let mut index = layer(1, &["f a", "l s a", "h t s"]);
        index.entries[1].meta.mode = 0o4640;
        let tree = merge(&[index]).expect("merge");
        for name in ["s", "t"] {
            let id = tree.resolve(name.as_bytes()).expect("link");
            assert_eq!(tree.node(id).meta.mode, 0o777, "{name}");
        }
    }

    #[test]
    fn last_duplicate_in_a_layer_wins() {
        assert_tree(
            &[&["f a 600", "d a 700", "f a 640"]],
            ". d 0755 0:0 n2
             a f 1@1:2 0640 0:0 n1",
        );
    }

    #[test]
    fn root_entry_sets_root_metadata() {
        assert_tree(&[&["d . 711", "d ./x"]], ". d 0711 0:0 n3\nx d 0644 0:0 n2");
    }

    #[test]
    fn dangling_hardlink_is_an_error_naming_layer_and_entry() {
        let err = merge(&[layer(1, &["h b missing"])]).expect_err("dangling link");
        let msg = err.to_string();
        assert!(
            msg.contains("layer 1") && msg.contains("\"b\"") && msg.contains("missing"),
            "{msg}"
        );
        let err = merge(&[layer(1, &["d d", "h b d"])]).expect_err("link to dir");
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn children_slices_clamp_to_the_directory() {
        let tree = merge(&[layer(1, &["f a", "f b", "f c"])]).expect("merge");
        let names = |c: Children| -> Vec<String> {
            c.iter()
                .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                .collect()
        };
        let root = tree.children(ROOT);
        assert_eq!(names(root.slice(1..3)), ["b", "c"]);
        assert_eq!(names(root.slice(2..9)), ["c"]);
        let (from, to) = (2, 1);
        assert!(root.slice(5..9).is_empty() && root.slice(from..to).is_empty());
        assert_eq!(names(root.starting_at(1)), ["b", "c"]);
        assert!(root.starting_at(usize::MAX).is_empty());
        assert_eq!(root.find(b"b"), tree.resolve(b"b"));
        assert_eq!(root.iter().next_back().map(|(n, _)| n), Some(&b"c"[..]));
    }

    #[test]
    fn inode_numbers_follow_sorted_walk() {
        let idx = [layer(1, &["f z", "d a", "f a/b", "h y z"])];
        let tree = merge(&idx).expect("merge");
        let order: Vec<(String, NodeId, bool)> = {
            let mut v = Vec::new();
            tree.walk(|p, id, first| {
                v.push((String::from_utf8_lossy(p).into_owned(), id, first));
                Ok(())
            })
            .expect("walk");
            v
        };
        let names: Vec<&str> = order.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(names, ["", "a", "a/b", "y", "z"]);
        assert_eq!(tree.resolve(b"y"), tree.resolve(b"z"));
        assert_eq!(tree.resolve(b"a/b"), Some(2));
        assert_eq!(tree.node(ROOT).nlink, 3);
    }
}
