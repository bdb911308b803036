//! Change sets: how one merged tree of an image (the base, after N layers) becomes another
//! (after M layers). `flatfs diff` lists them; `export --keep` writes them as one layer
//! (src/squash.rs). Both trees come from the same layer stack, so a file's content identity is
//! its extent (layer, offset): equal extents mean the same tar entry supplied the bytes.

use crate::error::Result;
use crate::tree::{NodeId, NodeKind, ROOT, Tree};

/// How a name of the newer tree relates to the same path in the older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Same type, data (a file's extent, a symlink's target, a device's numbers), metadata
    /// and xattrs; a directory's children do not count.
    Same,
    /// The path did not exist.
    Added,
    /// The path existed with another type, data, metadata or xattrs.
    Modified,
}

/// One step of [`compare`].
#[derive(Debug)]
pub enum Event<'a> {
    /// A name of the newer tree, in its walk order (parents first, children by name).
    Name {
        /// Path, empty for the root.
        path: &'a [u8],
        /// Node in the newer tree.
        id: NodeId,
        /// True on the node's first name in the walk (later names are its hardlinks).
        first: bool,
        /// The older tree's node at this path.
        old: Option<NodeId>,
        /// How the two compare.
        status: Status,
    },
    /// A name of the older tree that the newer lacks: every one, also under a deleted
    /// directory, each after the name it sorts after.
    Removed {
        /// Path.
        path: &'a [u8],
        /// Node in the older tree.
        id: NodeId,
        /// The newer tree's directory that lists the removed name's place, when a whiteout
        /// there would remove it: `None` under a removed directory or a path that is no longer
        /// a directory (removing or replacing that one takes everything below with it).
        whiteout_in: Option<NodeId>,
    },
}

/// Whether node `a` of `from` and node `b` of `to` are the same entry, children aside.
pub fn same_entry(from: &Tree, a: NodeId, to: &Tree, b: NodeId) -> bool {
    let (x, y) = (from.node(a), to.node(b));
    let kind = match (&x.kind, &y.kind) {
        (NodeKind::Dir(_), NodeKind::Dir(_)) | (NodeKind::Fifo, NodeKind::Fifo) => true,
        (NodeKind::File(e), NodeKind::File(f)) => e == f,
        (NodeKind::Symlink(s), NodeKind::Symlink(t)) => s == t,
        (NodeKind::Char(a1, b1), NodeKind::Char(a2, b2))
        | (NodeKind::Block(a1, b1), NodeKind::Block(a2, b2)) => (a1, b1) == (a2, b2),
        _ => false,
    };
    kind && x.meta == y.meta && x.xattrs.iter().eq(y.xattrs.iter())
}

/// Walks `to` and `from` side by side, one directory at a time (children are sorted, so a
/// merge join pairs them), and tells `visit` about every name of `to` and every name of
/// `from` that `to` lacks. No path tables: memory is the depth of the tree.
pub fn compare(from: &Tree, to: &Tree, mut visit: impl FnMut(&Event) -> Result<()>) -> Result<()> {
    struct Frame {
        dir: NodeId,
        old: Option<NodeId>,
        i: usize,
        j: usize,
        len: usize,
    }
    let mut seen = vec![false; to.len()];
    seen[ROOT as usize] = true;
    visit(&Event::Name {
        path: b"",
        id: ROOT,
        first: true,
        old: Some(ROOT),
        status: status(from, Some(ROOT), to, ROOT),
    })?;
    let mut path: Vec<u8> = Vec::new();
    let mut stack = vec![Frame {
        dir: ROOT,
        old: Some(ROOT),
        i: 0,
        j: 0,
        len: 0,
    }];
    while let Some(top) = stack.last_mut() {
        let new = to.children(top.dir).get(top.i);
        let old = top
            .old
            .and_then(|d| from.children(d).get(top.j))
            .filter(|(m, _)| new.is_none_or(|(n, _)| m <= &n));
        let (dir, len) = (top.dir, path.len());
        let push = |path: &mut Vec<u8>, name: &[u8]| {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
        };
        match (new, old) {
            (None, None) => {
                let frame = stack.pop().expect("stack is not empty");
                path.truncate(frame.len);
            }
            // Only in `from`: removed, with everything below it.
            (new, Some((name, gone))) if new.is_none_or(|(n, _)| name < n) => {
                top.j += 1;
                push(&mut path, name);
                removed(from, gone, &mut path, Some(dir), &mut visit)?;
                path.truncate(len);
            }
            (Some((name, id)), old) => {
                top.i += 1;
                let old = old.map(|(_, o)| o);
                if old.is_some() {
                    top.j += 1;
                }
                push(&mut path, name);
                let first = !std::mem::replace(&mut seen[id as usize], true);
                visit(&Event::Name {
                    path: &path,
                    id,
                    first,
                    old,
                    status: status(from, old, to, id),
                })?;
                let is_dir = to.node(id).is_dir();
                let old_dir = old.filter(|&o| from.node(o).is_dir());
                if let Some(o) = old_dir.filter(|_| !is_dir) {
                    // A directory replaced by a non-directory: its contents go with it.
                    for (name, child) in from.children(o) {
                        let l = path.len();
                        push(&mut path, name);
                        removed(from, child, &mut path, None, &mut visit)?;
                        path.truncate(l);
                    }
                }
                if first && is_dir {
                    stack.push(Frame {
                        dir: id,
                        old: old_dir,
                        i: 0,
                        j: 0,
                        len,
                    });
                } else {
                    path.truncate(len);
                }
            }
            (None, Some(_)) => unreachable!("a lone old name is handled above"),
        }
    }
    Ok(())
}

fn status(from: &Tree, old: Option<NodeId>, to: &Tree, id: NodeId) -> Status {
    match old {
        None => Status::Added,
        Some(o) if same_entry(from, o, to, id) => Status::Same,
        Some(_) => Status::Modified,
    }
}

/// Reports `id` at `path` (in `from`) and everything below it as removed.
fn removed(
    from: &Tree,
    id: NodeId,
    path: &mut Vec<u8>,
    whiteout_in: Option<NodeId>,
    visit: &mut impl FnMut(&Event) -> Result<()>,
) -> Result<()> {
    visit(&Event::Removed {
        path,
        id,
        whiteout_in,
    })?;
    // (directory, next child, path length at the directory)
    let mut stack: Vec<(NodeId, usize, usize)> = vec![(id, 0, path.len())];
    while let Some(top) = stack.last_mut() {
        let (dir, base) = (top.0, top.2);
        let Some((name, child)) = from.children(dir).get(top.1) else {
            stack.pop();
            path.truncate(base);
            continue;
        };
        top.1 += 1;
        path.truncate(base);
        path.push(b'/');
        path.extend_from_slice(name);
        visit(&Event::Removed {
            path,
            id: child,
            whiteout_in: None,
        })?;
        if from.node(child).is_dir() {
            stack.push((child, 0, path.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, Kind, LayerIndex, Meta};
    use crate::tree::merge;

    fn entry(path: &str, kind: Kind, offset: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            meta: Meta {
                mode: 0o644,
                ..Meta::default()
            },
            size: u64::from(kind == Kind::File),
            kind,
            offset,
            xattrs: Vec::new(),
            sparse: None,
        }
    }

    fn events(from: &Tree, to: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        compare(from, to, |e| {
            out.push(match e {
                Event::Name {
                    path,
                    status,
                    first,
                    ..
                } => format!(
                    "{:?} {}{}",
                    status,
                    String::from_utf8_lossy(path),
                    if *first { "" } else { " (link)" }
                ),
                Event::Removed {
                    path, whiteout_in, ..
                } => format!(
                    "Removed {}{}",
                    String::from_utf8_lossy(path),
                    if whiteout_in.is_some() { " (wh)" } else { "" }
                ),
            });
            Ok(())
        })
        .expect("compare");
        out
    }

    #[test]
    fn merge_join_reports_adds_changes_removals_and_type_changes() {
        let base = LayerIndex {
            label: "1".into(),
            entries: vec![
                entry("d", Kind::Dir, 0),
                entry("d/x", Kind::File, 1),
                entry("d/y", Kind::File, 2),
                entry("e", Kind::Dir, 3),
                entry("e/z", Kind::File, 4),
                entry("f", Kind::File, 5),
                entry("g", Kind::Dir, 6),
                entry("g/in", Kind::File, 7),
            ],
            ..LayerIndex::default()
        };
        let upper = LayerIndex {
            label: "2".into(),
            entries: vec![
                entry("d/a", Kind::File, 0),
                entry("f", Kind::Dir, 1),
                entry("f/new", Kind::File, 2),
                entry("g", Kind::Symlink(b"/x".to_vec()), 3),
                entry("h", Kind::Hardlink(b"d/x".to_vec()), 4),
            ],
            whiteouts: vec![b"d/y".to_vec(), b"e".to_vec()],
            ..LayerIndex::default()
        };
        let from = merge(std::slice::from_ref(&base)).expect("merge");
        let to = merge(&[base, upper]).expect("merge");
        assert_eq!(
            events(&from, &to),
            [
                "Same ",
                "Same d",
                "Added d/a",
                "Same d/x",
                "Removed d/y (wh)",
                "Removed e (wh)",
                "Removed e/z",
                "Modified f",
                "Added f/new",
                "Modified g",
                "Removed g/in",
                "Added h (link)",
            ]
        );
    }
}
