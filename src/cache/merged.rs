//! Merged-tree cache: the frozen tree of a stack of layers, saved as the arena's vectors in
//! their in-memory layout, so a warm mount maps the file, checks its checksum and the tree's
//! invariants, and serves the arena from the mapping, instead of loading every layer's index
//! and merging again (or copying the file record by record into vectors).
//!
//! The key is a sha256 over the cache format versions and, per layer in order, the layer's
//! cache key (blob digest, else diff_id) and diff_id. A tree is a function of exactly that: the
//! ordered layer contents and the merge rules (whose changes bump [`VERSION`]). So `--layers N`
//! is in the key as the list's length, and the platform only through the layers it selects:
//! two platforms, or two images, with the same layers share one tree, correctly. As for layer
//! indexes, a tree is used only while every blob file is the one it was built from (same
//! stamp); otherwise the layers go through [`Cache::load`], which re-verifies, and the tree is
//! rebuilt. Everything read is checked: a corrupt, stale or hostile file is ignored, never
//! trusted, and never a panic.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{Cache, Dec, Enc, SUM, checksum, stamp, write_atomically};
use crate::layer::Segment;
use crate::source::Layer;
use crate::tree::{ChildRec, MapRec, Mapping, NodeRec, Store, Tree, XattrRec};
use crate::zran::Checkpoints;

const MAGIC: &[u8; 8] = b"FLATFSMT";
/// Bump when the encoding, the merge rules or the meaning of a field change.
const VERSION: u32 = 6;
/// Encoded sizes of the arena's records: nodes, children and xattrs are used in place, so
/// these are also their sizes in memory (checked below), and every section starts 8-aligned.
const NODE: usize = 64;
const CHILD: usize = 16;
const XATTR: usize = 24;
const _: () = assert!(
    size_of::<NodeRec>() == NODE
        && size_of::<ChildRec>() == CHILD
        && size_of::<XattrRec>() == XATTR
        && std::mem::offset_of!(NodeRec, mode) == 40
        && std::mem::offset_of!(NodeRec, tag) == 60
        && std::mem::offset_of!(ChildRec, id) == 12
        && std::mem::offset_of!(XattrRec, value_len) == 16
);
const MAP: usize = 16;
const SEGMENT: usize = 24;

/// A tree and what reading its files needs: per layer, the gzip checkpoints.
pub type CachedTree = (Tree, Vec<Option<Arc<Checkpoints>>>);

impl Cache {
    /// The key of a stack of layers, bottom first; `None` if a layer has no digest at all.
    fn tree_key(layers: &[Layer]) -> Option<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(MAGIC);
        h.update(VERSION.to_le_bytes());
        h.update(super::VERSION.to_le_bytes());
        h.update((layers.len() as u64).to_le_bytes());
        for layer in layers {
            for part in [Self::key(layer)?, layer.diff_id.as_deref().unwrap_or("")] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        Some(h.finalize().into())
    }

    fn tree_path(&self, key: &[u8; 32]) -> PathBuf {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.tree"))
    }

    /// The merged tree of exactly these layers (bottom first), with their checkpoints, if the
    /// cache holds a valid one built from these very blob files.
    pub fn load_tree(&self, layers: &[Layer]) -> Option<CachedTree> {
        // The file is little-endian and used in place.
        if cfg!(target_endian = "big") {
            return None;
        }
        let key = Self::tree_key(layers)?;
        let file = File::open(self.tree_path(&key)).ok()?;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        let stamps: Vec<[u64; 6]> = layers.iter().map(stamp).collect();
        let map = Arc::new(Mapping::of_file(&file, len).ok()?);
        let tree = decode(&map, &key, &stamps)?;
        // Whatever checkpoints indexing recorded for a layer (gzip's, say) live in its index
        // file's head: taken from there for every layer, a hit gives what a merge would.
        // A layer read through its TOC has none, and no index file: its stamp (the TOC's
        // digest) is what ties the tree to it.
        let checkpoints = layers
            .iter()
            .map(|l| match l.blob.toc() {
                Some(_) => Some(None),
                None => self.load_checkpoints(l),
            })
            .collect::<Option<Vec<_>>>()?;
        Some((tree, checkpoints))
    }

    /// Saves the merged tree of these layers (bottom first).
    pub fn store_tree(&self, layers: &[Layer], tree: &Tree) -> io::Result<()> {
        let Some(key) = Self::tree_key(layers).filter(|_| cfg!(target_endian = "little")) else {
            return Ok(());
        };
        let stamps: Vec<[u64; 6]> = layers.iter().map(stamp).collect();
        write_atomically(
            &self.dir,
            &self.tree_path(&key),
            &encode(tree, &key, &stamps),
        )
    }
}

fn encode(tree: &Tree, key: &[u8; 32], stamps: &[[u64; 6]]) -> Vec<u8> {
    let size = 128
        + stamps.len() * 48
        + tree.nodes.len() * NODE
        + tree.children.len() * CHILD
        + tree.xattrs.len() * XATTR
        + tree.maps.len() * MAP
        + tree.segments.len() * SEGMENT
        + tree.bytes.len();
    let mut e = Enc(Vec::with_capacity(size));
    e.0.extend_from_slice(MAGIC);
    e.u32(VERSION);
    e.u32(0); // so that what follows is 8-aligned
    e.0.extend_from_slice(key);
    e.u64(stamps.len() as u64);
    for s in stamps.iter().flatten() {
        e.u64(*s);
    }
    for n in [
        tree.nodes.len(),
        tree.children.len(),
        tree.xattrs.len(),
        tree.maps.len(),
        tree.segments.len(),
        tree.bytes.len(),
    ] {
        e.u64(n as u64);
    }
    for n in &tree.nodes {
        e.u64(n.mtime as u64);
        e.u64(n.uid);
        e.u64(n.gid);
        e.u64(n.a);
        e.u64(n.b);
        e.u32(n.mode);
        e.u32(n.mtime_nsec);
        e.u32(n.nlink);
        e.u32(n.parent);
        e.u32(n.layer);
        e.u8(n.tag);
        e.0.extend_from_slice(&[0; 3]);
    }
    for c in &tree.children {
        e.u64(c.at);
        e.u32(c.len);
        e.u32(c.id);
    }
    for x in &tree.xattrs {
        e.u64(x.at);
        e.u32(x.node);
        e.u32(x.name_len);
        e.u32(x.value_len);
        e.u32(0);
    }
    for m in &tree.maps {
        e.u64(m.start);
        e.u64(m.count);
    }
    for s in &tree.segments {
        e.u64(s.logical);
        e.u64(s.len);
        e.u64(s.tar);
    }
    e.0.extend_from_slice(&tree.bytes);
    let sum = checksum(&e.0);
    e.0.extend_from_slice(&sum);
    e.0
}

/// The checked body of a tree file of this version (after magic and version).
fn body<'a>(bytes: &'a [u8]) -> Option<Dec<'a>> {
    let (body, sum) = bytes.split_at(bytes.len().checked_sub(SUM)?);
    if checksum(body) != sum {
        return None;
    }
    let mut d = Dec(body);
    if d.take(8)? != MAGIC || d.u32()? != VERSION || d.u32()? != 0 {
        return None;
    }
    Some(d)
}

/// The little-endian u64 at `at` in a record (whose length the caller knows).
fn le64(r: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&r[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Nodes in a tree file, for `flatfs cache ls`.
pub(super) fn node_count(bytes: &[u8]) -> Option<u64> {
    let mut d = body(bytes)?;
    d.take(32)?;
    let layers = d.count(48)?;
    d.take(layers * 48)?;
    d.u64()
}

/// The tree in a mapped tree file, if it is whole (checksum), of this key and these stamps,
/// and holds together ([`Tree::is_valid`]). Nodes, children, xattrs and names stay in the
/// mapping; only the (rare) sparse maps are copied out.
///
/// Everything is checked before the tree is returned: nothing in the file is used unchecked.
/// The checksum runs over every byte, and the validity walk over every record, which is what
/// a warm mount spends its time on; a checksum alone would let a file written by a buggy or
/// hostile writer through, and the walk is what makes the tree's readers safe without checks
/// of their own.
fn decode(map: &Arc<Mapping>, key: &[u8; 32], stamps: &[[u64; 6]]) -> Option<Tree> {
    let mut d = body(map.bytes())?;
    let body_len = map.bytes().len() - SUM;
    if d.take(32)? != key || d.count(48)? != stamps.len() {
        return None;
    }
    for s in stamps.iter().flatten() {
        if d.u64()? != *s {
            return None;
        }
    }
    let mut counts = [0usize; 6];
    for c in &mut counts {
        *c = usize::try_from(d.u64()?).ok()?;
    }
    let [nodes, children, xattrs, maps, segments, bytes] = counts;
    let mut at = body_len - d.0.len();
    let mut section = |count: usize, size: usize| {
        let start = at;
        at = count.checked_mul(size)?.checked_add(at)?;
        (at <= body_len).then_some(start)
    };
    let nodes_at = section(nodes, NODE)?;
    let children_at = section(children, CHILD)?;
    let xattrs_at = section(xattrs, XATTR)?;
    let maps_at = section(maps, MAP)?;
    let segments_at = section(segments, SEGMENT)?;
    let bytes_at = section(bytes, 1)?;
    if at != body_len {
        return None;
    }
    let file = map.bytes();
    let records =
        |at: usize, count: usize, size: usize| file[at..at + count * size].chunks_exact(size);
    let tree = Tree {
        nodes: Store::mapped(map, nodes_at, nodes)?,
        children: Store::mapped(map, children_at, children)?,
        xattrs: Store::mapped(map, xattrs_at, xattrs)?,
        bytes: Store::mapped(map, bytes_at, bytes)?,
        maps: records(maps_at, maps, MAP)
            .map(|r| MapRec {
                start: le64(r, 0),
                count: le64(r, 8),
            })
            .collect(),
        segments: records(segments_at, segments, SEGMENT)
            .map(|r| Segment {
                logical: le64(r, 0),
                len: le64(r, 8),
                tar: le64(r, 16),
            })
            .collect(),
    };
    // The checksum only says the file is as written; what was written must still make sense.
    tree.is_valid(stamps.len()).then_some(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind, LayerIndex, Meta};
    use crate::tree::{ROOT, listing, merge};

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            meta: Meta {
                mode: 0o755,
                uid: 1 << 40,
                gid: 3,
                mtime: -7,
                mtime_nsec: 9,
            },
            size: 5,
            offset: 512,
            xattrs: Vec::new(),
            sparse: None,
        }
    }

    fn sample() -> Tree {
        let mut f = entry("d/f", Kind::File);
        f.xattrs = vec![
            (b"user.x".to_vec(), b"\0\xff".to_vec()),
            (b"user.e".to_vec(), vec![]),
        ];
        let layers = [
            LayerIndex {
                entries: vec![
                    entry("d", Kind::Dir),
                    f,
                    entry("d/h", Kind::Hardlink(b"d/f".to_vec())),
                    entry("d/e/deep", Kind::Dir),
                    entry("s", Kind::Symlink(b"../../etc".to_vec())),
                    entry("c", Kind::Char(1, 3)),
                    // Replaced above: its map must not reach the arena.
                    sparse_entry("gone", &[(1, 1)]),
                ],
                ..LayerIndex::default()
            },
            LayerIndex {
                entries: vec![
                    entry("b", Kind::Block(8, 1)),
                    entry("p", Kind::Fifo),
                    sparse_entry("q", &[(0, 3), (100, 4)]),
                    sparse_entry("r", &[(10, 1), (11, 2), (1 << 40, 5)]),
                    entry("qh", Kind::Hardlink(b"q".to_vec())),
                    entry("gone", Kind::Fifo),
                ],
                ..LayerIndex::default()
            },
        ];
        merge(&layers).expect("merge")
    }

    /// A sparse file of 2^41 bytes with these runs, stored from offset 1024.
    fn sparse_entry(path: &str, runs: &[(u64, u64)]) -> Entry {
        let mut e = entry(path, Kind::File);
        e.size = 1 << 41;
        e.offset = 1024;
        let mut tar = 1024;
        e.sparse = Some(
            runs.iter()
                .map(|&(logical, len)| {
                    tar += len;
                    crate::layer::Segment {
                        logical,
                        len,
                        tar: tar - len,
                    }
                })
                .collect(),
        );
        e
    }

    #[test]
    fn sparse_files_keep_their_runs() {
        let tree = sample();
        let q = tree.resolve(b"q").expect("q");
        let crate::tree::NodeKind::File(e) = tree.node(q).kind else {
            panic!("q is a file");
        };
        assert_eq!((e.size, e.offset, e.stored()), (1 << 41, 1024, 7));
        assert_eq!(e.sparse.map(<[_]>::len), Some(2));
        // A hardlink shares the map; a replaced sparse file leaves none behind.
        assert_eq!(tree.resolve(b"qh"), Some(q));
        assert_eq!(tree.node(q).nlink, 2);
        assert_eq!(tree.maps.len(), 2);
        assert_eq!(tree.segments.len(), 5);
    }

    /// Decodes a tree file held in memory, as `load_tree` does a mapped one.
    fn dec(bytes: &[u8], key: &[u8; 32], stamps: &[[u64; 6]]) -> Option<Tree> {
        decode(&Arc::new(Mapping::from_bytes(bytes)), key, stamps)
    }

    const KEY: [u8; 32] = [7; 32];
    const STAMPS: [[u64; 6]; 2] = [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]];

    #[test]
    fn round_trip_gives_the_same_arena() {
        let tree = sample();
        let bytes = encode(&tree, &KEY, &STAMPS);
        let back = dec(&bytes, &KEY, &STAMPS).expect("decodes");
        assert_eq!(back, tree);
        assert_eq!(listing(&back), listing(&tree));
        assert_eq!(node_count(&bytes), Some(tree.len() as u64));
    }

    #[test]
    fn a_mapped_tree_outlives_its_file_being_replaced_or_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.tree");
        let tree = sample();
        let bytes = encode(&tree, &KEY, &STAMPS);
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        let map = Arc::new(Mapping::of_file(&file, bytes.len()).expect("map"));
        assert!(matches!(*map, Mapping::Map { .. }), "not mapped");
        let back = decode(&map, &KEY, &STAMPS).expect("decodes");
        // As the cache changes files: a new one renamed over it, then removal.
        write_atomically(dir.path(), &path, &vec![0xff; bytes.len()]).expect("replace");
        std::fs::remove_file(&path).expect("remove");
        drop((file, map));
        assert_eq!(back, tree);
        assert_eq!(listing(&back), listing(&tree));
    }

    #[test]
    fn another_key_stamp_or_layer_count_is_a_miss() {
        let bytes = encode(&sample(), &KEY, &STAMPS);
        assert!(dec(&bytes, &[8; 32], &STAMPS).is_none());
        let mut stamps = STAMPS;
        stamps[1][0] += 1;
        assert!(dec(&bytes, &KEY, &stamps).is_none());
        assert!(dec(&bytes, &KEY, &STAMPS[..1]).is_none());
    }

    #[test]
    fn any_corruption_is_rejected() {
        let bytes = encode(&sample(), &KEY, &STAMPS);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            assert!(dec(&b, &KEY, &STAMPS).is_none(), "flipped byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(dec(&bytes[..n], &KEY, &STAMPS).is_none(), "cut at {n}");
        }
    }

    /// Files with a good checksum whose trees break an invariant: each must be refused, as a
    /// hostile or buggy writer's would be.
    #[test]
    fn lying_trees_are_rejected_despite_a_good_checksum() {
        let good = sample();
        let dir = |t: &Tree, path: &[u8]| t.resolve(path).expect("exists") as usize;
        let d = dir(&good, b"d");
        let deep_parent = dir(&good, b"d/e");
        let child_of = |t: &Tree, parent: usize, name: &[u8]| {
            let first = t.nodes[parent].a as usize;
            first
                + t.children[first..]
                    .iter()
                    .position(|c| c.name(&t.bytes) == name)
                    .expect("child")
        };
        type Edit = Box<dyn Fn(&mut Tree)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("no nodes", Box::new(|t| t.nodes.clear())),
            (
                "root a file",
                Box::new(|t| t.nodes[0].tag = crate::tree::TAG_FILE),
            ),
            ("unknown kind", Box::new(|t| t.nodes[1].tag = 7)),
            (
                "a file made sparse",
                Box::new(|t| {
                    let f = t.resolve(b"d/f").expect("f") as usize;
                    t.nodes[f].tag = crate::tree::TAG_SPARSE | (t.nodes[f].tag & 0x80);
                }),
            ),
            ("runs out of order", Box::new(|t| t.segments.swap(0, 1))),
            ("runs overlapping", Box::new(|t| t.segments[1].logical = 2)),
            ("an empty run", Box::new(|t| t.segments[2].len = 0)),
            (
                "a run past the real size",
                Box::new(|t| t.segments[4].logical = (1 << 41) - 4),
            ),
            (
                "a run that wraps",
                Box::new(|t| t.segments[4].logical = u64::MAX - 1),
            ),
            (
                "runs not back to back",
                Box::new(|t| t.segments[1].tar += 1),
            ),
            (
                "a run's bytes that wrap",
                Box::new(|t| t.segments[2].tar = u64::MAX),
            ),
            (
                "a map used twice",
                Box::new(|t| {
                    let r = t.resolve(b"r").expect("r") as usize;
                    t.nodes[r].a = 0;
                }),
            ),
            ("a map past the segments", Box::new(|t| t.maps[1].count = 4)),
            (
                "a map left over",
                Box::new(|t| t.maps.push(crate::tree::MapRec { start: 5, count: 0 })),
            ),
            (
                "segments left over",
                Box::new(|t| t.segments.push(t.segments[4])),
            ),
            ("name out of range", {
                Box::new(move |t| {
                    let c = child_of(t, d, b"f");
                    t.children[c].at = t.bytes.len() as u64;
                })
            }),
            ("name `..`", {
                Box::new(move |t| {
                    let c = child_of(t, d, b"e");
                    let at = t.children[c].at as usize;
                    t.bytes[at] = b'.';
                    t.children[c].len = 1;
                })
            }),
            ("names out of order", {
                Box::new(move |t| {
                    let (e, f) = (child_of(t, d, b"e"), child_of(t, d, b"f"));
                    t.children.swap(e, f);
                })
            }),
            (
                "child id out of range",
                Box::new(|t| t.children[0].id = u32::MAX),
            ),
            ("child is the root", Box::new(|t| t.children[0].id = ROOT)),
            ("a cycle", {
                Box::new(move |t| {
                    // `d/e/deep` named `d` again: d's subtree would contain itself.
                    let c = child_of(t, deep_parent, b"deep");
                    t.children[c].id = d as u32;
                })
            }),
            (
                "parent not a directory",
                Box::new(|t| t.nodes[1].parent = 2),
            ),
            ("children range overlaps", Box::new(|t| t.nodes[0].a = 1)),
            (
                "children past the end",
                Box::new(|t| t.nodes[0].b = u64::MAX),
            ),
            ("wrong link count", Box::new(|t| t.nodes[0].nlink += 1)),
            ("layer out of range", Box::new(|t| t.nodes[1].layer = 3)),
            ("file extent that wraps", {
                Box::new(move |t| {
                    let f = t.children[child_of(t, d, b"f")].id as usize;
                    t.nodes[f].a = u64::MAX - 10;
                    t.nodes[f].b = 20;
                })
            }),
            ("symlink target out of range", {
                Box::new(|t| {
                    let s = t.resolve(b"s").expect("s") as usize;
                    t.nodes[s].b = u64::MAX;
                })
            }),
            (
                "xattr out of range",
                Box::new(|t| t.xattrs[0].value_len = u32::MAX),
            ),
            (
                "xattr of no node",
                Box::new(|t| t.xattrs[1].node = u32::MAX),
            ),
            (
                "xattr flag without xattrs",
                Box::new(|t| t.nodes[0].tag |= 0x80),
            ),
            ("device number too big", {
                Box::new(|t| {
                    let c = t.resolve(b"c").expect("c") as usize;
                    t.nodes[c].a = 1 << 32;
                })
            }),
        ];
        for (what, edit) in edits {
            let mut t = sample();
            edit(&mut t);
            let bytes = encode(&t, &KEY, &STAMPS);
            assert!(dec(&bytes, &KEY, &STAMPS).is_none(), "{what}: accepted");
        }
    }
}
