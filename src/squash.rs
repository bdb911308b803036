//! Partial squash (`export --keep N`): which entries, whiteouts and opaque markers the one layer
//! that replaces layers N+1..top holds, from the change set between the merged tree after N
//! layers and after all of them (src/changes.rs); and the kept layers' blobs and descriptors.
//! src/export.rs writes the layer (in the full tree's walk order) and the image around it.
//!
//! The rules (docs/design.md, "Partial squash"):
//! - a name whose entry is new or changed is written in full; a non-directory node with any
//!   such name is written under all its names (first as the file, the rest as hardlinks to it,
//!   all inside this layer), so the link structure comes out whole on every applier;
//! - a name gone from the top gets a whiteout in the nearest directory that survives as a
//!   directory (one for a whole deleted directory; none under a path that became a
//!   non-directory, whose entry replaces it);
//! - a directory whose base contents are mostly gone or replaced gets an opaque marker, and
//!   then all of its surviving contents, when that makes a smaller layer;
//! - every directory on the way to something written is written too, with its (unchanged)
//!   metadata: appliers that create a missing parent themselves give it their own mode, owner
//!   and time, which an overlay mount then shows;
//! - nothing else is written.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::changes::{Event, Status, compare};
use crate::error::{Error, Result};
use crate::source::{Image, Layer};
use crate::tree::{NodeId, NodeKind, ROOT, Tree};

/// Bytes of a tar header, the unit of the cost model.
const BLOCK: u64 = 512;

/// What goes into the squashed layer, by node of the full tree.
#[derive(Debug)]
pub struct Plan {
    write: Vec<bool>,
    opaque: Vec<bool>,
    whiteouts: HashMap<NodeId, Vec<Vec<u8>>>,
    /// Counts, for messages and tests.
    pub stats: Stats,
}

/// What a plan writes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Names added or modified: what `flatfs diff --from N` lists with `+` and `~`.
    pub changed: u64,
    /// Names written in all: `changed`, plus unchanged names of a node written for another of
    /// its names, names under an opaque directory, and directories on the way to a change.
    pub names: u64,
    /// Whiteouts.
    pub whiteouts: u64,
    /// Opaque markers.
    pub opaques: u64,
}

const UNSET: u32 = u32::MAX;
const MIXED: u32 = u32::MAX - 1;

impl Plan {
    /// The plan for the layer that turns `base` into `tree` (both from one layer stack).
    pub fn new(base: &Tree, tree: &Tree) -> Result<Plan> {
        let n = tree.len();
        // dirty: a name of the node is added or modified. both_dir: a directory that was one
        // at the same path in the base. same_as: the base node every name of a non-directory
        // matches (MIXED when the names disagree or one does not match).
        let mut dirty = vec![false; n];
        let mut both_dir = vec![false; n];
        let mut same_as = vec![UNSET; n];
        let mut whiteouts: HashMap<NodeId, Vec<Vec<u8>>> = HashMap::new();
        let mut changed = 0u64;
        compare(base, tree, |e| {
            match *e {
                Event::Name {
                    path,
                    id,
                    old,
                    status,
                    ..
                } => {
                    let i = id as usize;
                    if status != Status::Same {
                        dirty[i] = true;
                        changed += u64::from(!path.is_empty());
                    }
                    if tree.node(id).is_dir() {
                        both_dir[i] = old.is_some_and(|o| base.node(o).is_dir());
                    } else {
                        same_as[i] = match (status, old) {
                            (Status::Same, Some(o)) if same_as[i] == UNSET || same_as[i] == o => o,
                            _ => MIXED,
                        };
                    }
                }
                Event::Removed {
                    path,
                    whiteout_in: Some(dir),
                    ..
                } => {
                    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
                    whiteouts.entry(dir).or_default().push(name.to_vec());
                }
                Event::Removed { .. } => {}
            }
            Ok(())
        })?;

        // A base node may stand for one node of the top only: two that both match it (names
        // of one hardlinked base node, rewritten apart) must both be written.
        let mut claims = vec![0u8; base.len()];
        for &s in &same_as {
            if s < MIXED {
                claims[s as usize] = claims[s as usize].saturating_add(1);
            }
        }
        let mut write: Vec<bool> = (0..n)
            .map(|i| {
                let s = same_as[i];
                !tree.node(i as NodeId).is_dir() && (s >= MIXED || claims[s as usize] > 1)
            })
            .collect();

        // Opaque or whiteouts, per directory, children first (a child directory's id is
        // greater than its parent's). Costs are tar bytes, roughly: a header per name or
        // marker, a file's padded content shared among its names.
        let entry_cost = |id: NodeId| {
            let node = tree.node(id);
            BLOCK
                + match node.kind {
                    NodeKind::File(e) => {
                        e.size.next_multiple_of(BLOCK) / u64::from(node.nlink.max(1))
                    }
                    _ => 0,
                }
        };
        let mut full = vec![0u64; n];
        let mut best = vec![0u64; n];
        let mut opaque = vec![false; n];
        for id in (0..n as NodeId).rev() {
            let NodeKind::Dir(children) = tree.node(id).kind else {
                continue;
            };
            let i = id as usize;
            let (mut all, mut minimal) = (0u64, 0u64);
            for (_, c) in children {
                let ci = c as usize;
                let own = entry_cost(c);
                if tree.node(c).is_dir() {
                    all += own + full[ci];
                    minimal += if !both_dir[ci] {
                        own + full[ci]
                    } else if best[ci] > 0 || dirty[ci] {
                        own + best[ci]
                    } else {
                        0
                    };
                } else {
                    all += own;
                    minimal += if write[ci] { own } else { 0 };
                }
            }
            let wh = whiteouts.get(&id).map_or(0, |w| w.len() as u64);
            minimal += wh * BLOCK;
            full[i] = all;
            // Never at the root: an opaque root is legal, but appliers handle it least alike.
            if id != ROOT && both_dir[i] && BLOCK + all < minimal {
                opaque[i] = true;
                best[i] = BLOCK + all;
            } else {
                best[i] = minimal;
            }
        }

        // Under an opaque directory everything is written and nothing else is marked.
        let mut under = vec![false; n];
        for id in 0..n as NodeId {
            let NodeKind::Dir(children) = tree.node(id).kind else {
                continue;
            };
            let i = id as usize;
            if under[i] {
                opaque[i] = false;
            }
            if under[i] || opaque[i] {
                for (_, c) in children {
                    under[c as usize] |= tree.node(c).is_dir();
                    write[c as usize] = true;
                }
            }
        }
        // An opaque directory hides all its base contents: a whiteout there adds nothing.
        whiteouts.retain(|d, _| !opaque[*d as usize] && !under[*d as usize]);

        // Directories on the way to anything written, children first.
        for id in (0..n as NodeId).rev() {
            let NodeKind::Dir(children) = tree.node(id).kind else {
                continue;
            };
            let i = id as usize;
            write[i] = write[i]
                || dirty[i]
                || opaque[i]
                || whiteouts.contains_key(&id)
                || children.iter().any(|(_, c)| write[c as usize]);
        }

        let mut names = u64::from(write[ROOT as usize]);
        for id in 0..n as NodeId {
            if let NodeKind::Dir(children) = tree.node(id).kind {
                names += children.iter().filter(|(_, c)| write[*c as usize]).count() as u64;
            }
        }
        let stats = Stats {
            changed,
            names,
            whiteouts: whiteouts.values().map(|w| w.len() as u64).sum(),
            opaques: opaque.iter().filter(|o| **o).count() as u64,
        };
        Ok(Plan {
            write,
            opaque,
            whiteouts,
            stats,
        })
    }

    /// Whether the node's names are written.
    pub fn writes(&self, id: NodeId) -> bool {
        self.write.get(id as usize).copied().unwrap_or(false)
    }

    /// The markers that follow directory `dir`'s entry: its opaque marker, and the names to
    /// white out in it, sorted.
    pub fn markers(&self, dir: NodeId) -> (bool, &[Vec<u8>]) {
        (
            self.opaque.get(dir as usize).copied().unwrap_or(false),
            self.whiteouts.get(&dir).map_or(&[], |w| w.as_slice()),
        )
    }
}

/// A kept layer as the output lists it: the blob as it is, and its descriptor.
#[derive(Debug, Clone)]
pub struct Kept {
    /// The blob, copied byte for byte.
    pub blob: crate::blob::Blob,
    /// sha256 of the blob.
    pub digest: String,
    /// The OCI descriptor: the source manifest's, unchanged, or one made for a docker
    /// archive's layer from its compression.
    pub descriptor: Value,
}

/// The first `keep` layers of `image`, as the output will hold them.
pub fn kept_layers(image: &Image, keep: usize) -> Result<Vec<Kept>> {
    image.layers[..keep.min(image.layers.len())]
        .iter()
        .map(kept_layer)
        .collect()
}

fn kept_layer(layer: &Layer) -> Result<Kept> {
    let digest = match (&layer.digest, &layer.diff_id, layer.compression) {
        (Some(d), _, _) => d.clone(),
        // A plain tar is its own diff_id, which the indexing pass (or the cache) checked.
        (None, Some(d), crate::blob::Compression::None) => d.clone(),
        _ => crate::cache::blob_digest(layer).map_err(|e| Error::Layer {
            layer: layer.label(),
            source: e,
        })?,
    };
    let descriptor = match &layer.descriptor {
        Some(d) => d.clone(),
        None => json!({
            "mediaType": match layer.compression {
                crate::blob::Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                crate::blob::Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
                crate::blob::Compression::None => "application/vnd.oci.image.layer.v1.tar",
            },
            "digest": digest,
            "size": layer.blob.len(),
        }),
    };
    Ok(Kept {
        blob: layer.blob.clone(),
        digest,
        descriptor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind, LayerIndex, Meta};
    use crate::tree::{listing, merge};

    fn entry(path: &str, kind: Kind, offset: u64, size: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            meta: Meta {
                mode: 0o644,
                ..Meta::default()
            },
            size,
            kind,
            offset,
            xattrs: Vec::new(),
            sparse: None,
        }
    }

    fn f(path: &str, offset: u64) -> Entry {
        entry(path, Kind::File, offset, 1)
    }

    fn d(path: &str) -> Entry {
        entry(path, Kind::Dir, 0, 0)
    }

    fn layer(n: usize, entries: Vec<Entry>, whiteouts: &[&str]) -> LayerIndex {
        LayerIndex {
            label: n.to_string(),
            entries,
            whiteouts: whiteouts.iter().map(|w| w.as_bytes().to_vec()).collect(),
            ..LayerIndex::default()
        }
    }

    /// The plan as `path` (written names), `path/.wh.x` and `path/.wh..wh..opq` lines.
    fn planned(layers: &[LayerIndex], keep: usize) -> (Vec<String>, Stats) {
        let base = merge(&layers[..keep]).expect("merge");
        let tree = merge(layers).expect("merge");
        let plan = Plan::new(&base, &tree).expect("plan");
        let mut out = Vec::new();
        tree.walk(|path, id, _| {
            if !plan.writes(id) {
                return Ok(());
            }
            let p = String::from_utf8_lossy(path).into_owned();
            out.push(if p.is_empty() { ".".into() } else { p.clone() });
            let (opq, wh) = plan.markers(id);
            let dir = if p.is_empty() {
                String::new()
            } else {
                format!("{p}/")
            };
            if opq {
                out.push(format!("{dir}.wh..wh..opq"));
            }
            for w in wh {
                out.push(format!("{dir}.wh.{}", String::from_utf8_lossy(w)));
            }
            Ok(())
        })
        .expect("walk");
        assert!(!listing(&tree).is_empty());
        (out, plan.stats)
    }

    #[test]
    fn unchanged_stack_gives_an_empty_plan() {
        let layers = [
            layer(1, vec![d("a"), f("a/x", 0)], &[]),
            layer(2, vec![d("a")], &[]),
        ];
        let (out, stats) = planned(&layers, 1);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(stats, Stats::default());
    }

    #[test]
    fn one_whiteout_for_a_deleted_directory_and_parents_on_the_way() {
        let layers = [
            layer(
                1,
                vec![d("a"), d("a/b"), f("a/b/x", 0), f("a/b/y", 1), f("a/k", 2)],
                &[],
            ),
            layer(2, vec![f("c/new", 0)], &["a/b"]),
        ];
        let (out, stats) = planned(&layers, 1);
        assert_eq!(out, [".", "a", "a/.wh.b", "c", "c/new"]);
        assert_eq!(stats.changed, 2);
        assert_eq!(stats.names, 4);
        assert_eq!(stats.whiteouts, 1);
    }

    #[test]
    fn mostly_replaced_directory_goes_opaque_with_its_survivors() {
        let mut base = vec![d("a"), f("a/keep", 0)];
        base.extend((0..10).map(|i| f(&format!("a/old{i}"), i + 1)));
        let layers = [
            layer(1, base, &[]),
            layer(
                2,
                vec![f("a/new", 0)],
                &[
                    "a/old0", "a/old1", "a/old2", "a/old3", "a/old4", "a/old5", "a/old6", "a/old7",
                    "a/old8", "a/old9",
                ],
            ),
        ];
        let (out, stats) = planned(&layers, 1);
        assert_eq!(out, [".", "a", "a/.wh..wh..opq", "a/keep", "a/new"]);
        assert_eq!((stats.opaques, stats.whiteouts), (1, 0));
    }

    #[test]
    fn type_changes_need_no_whiteout() {
        let layers = [
            layer(1, vec![d("a"), f("a/x", 0), f("b", 1)], &[]),
            layer(2, vec![f("a", 0), d("b"), f("b/y", 1)], &[]),
        ];
        let (out, _) = planned(&layers, 1);
        assert_eq!(out, [".", "a", "b", "b/y"]);
    }

    #[test]
    fn a_new_name_for_a_base_file_rewrites_all_its_names() {
        let layers = [
            layer(1, vec![f("a", 0), f("z", 1)], &[]),
            layer(
                2,
                vec![entry("b", Kind::Hardlink(b"a".to_vec()), 0, 0)],
                &[],
            ),
        ];
        let (out, stats) = planned(&layers, 1);
        assert_eq!(out, [".", "a", "b"]);
        assert_eq!((stats.changed, stats.names), (1, 3));
    }

    #[test]
    fn a_removed_link_name_needs_only_its_whiteout() {
        let layers = [
            layer(
                1,
                vec![f("a", 0), entry("b", Kind::Hardlink(b"a".to_vec()), 0, 0)],
                &[],
            ),
            layer(2, vec![], &["b"]),
        ];
        let (out, _) = planned(&layers, 1);
        assert_eq!(out, [".", ".wh.b"]);
    }

    #[test]
    fn a_base_link_group_reaching_into_an_opaque_directory_is_written_whole() {
        // `a/x` and `out` are one base file; `a` goes opaque, so `a/x` is rewritten, and with
        // it `out` (else `a/x` would come back as a copy, no longer linked to `out`).
        let mut base = vec![
            d("a"),
            f("a/x", 0),
            entry("out", Kind::Hardlink(b"a/x".to_vec()), 0, 0),
        ];
        base.extend((0..10).map(|i| f(&format!("a/old{i}"), i + 1)));
        let gone: Vec<String> = (0..10).map(|i| format!("a/old{i}")).collect();
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        let layers = [layer(1, base, &[]), layer(2, vec![f("a/new", 0)], &gone)];
        let (out, stats) = planned(&layers, 1);
        assert_eq!(out, [".", "a", "a/.wh..wh..opq", "a/new", "a/x", "out"]);
        assert_eq!((stats.changed, stats.opaques, stats.whiteouts), (1, 1, 0));
    }

    #[test]
    fn symlinks_rewritten_apart_are_both_written() {
        let sym = |p: &str| entry(p, Kind::Symlink(b"t".to_vec()), 0, 0);
        let layers = [
            layer(
                1,
                vec![sym("s"), entry("u", Kind::Hardlink(b"s".to_vec()), 0, 0)],
                &[],
            ),
            layer(2, vec![sym("u")], &[]),
        ];
        let (out, stats) = planned(&layers, 1);
        // Both names still read `t`, but are two nodes now.
        assert_eq!(stats.changed, 0);
        assert_eq!(out, [".", "s", "u"]);
    }
}
