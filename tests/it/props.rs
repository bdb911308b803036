//! Property test (issue 5): random layer stacks, exported by the real binary, against a
//! deliberately naive model of the overlay rules; and export → re-import keeps the tree.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proptest::prelude::*;

use crate::util::*;

/// One entry of a generated layer, by the path it names.
#[derive(Clone, Debug)]
enum Op {
    File(String),
    Dir(String),
    Symlink(String, &'static str),
    Hardlink(String, String),
    Whiteout(String),
    /// The opaque marker of a directory (`""` is the root).
    Opaque(String),
}

/// Paths from a small alphabet, so that layers keep hitting each other's names.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
        .prop_map(|c| c.join("/"))
}

/// An op as generated: a hardlink picks its target among the names created before it.
#[derive(Clone, Debug)]
enum Gen {
    Op(Op),
    Link(String, prop::sample::Index),
}

fn op() -> impl Strategy<Value = Gen> {
    prop_oneof![
        4 => path().prop_map(|p| Gen::Op(Op::File(p))),
        3 => path().prop_map(|p| Gen::Op(Op::Dir(p))),
        1 => (path(), prop::sample::select(vec!["a", "../..", "/etc", "b/c"]))
            .prop_map(|(p, t)| Gen::Op(Op::Symlink(p, t))),
        2 => (path(), any::<prop::sample::Index>()).prop_map(|(p, i)| Gen::Link(p, i)),
        2 => path().prop_map(|p| Gen::Op(Op::Whiteout(p))),
        1 => prop_oneof![Just(String::new()), path()].prop_map(|p| Gen::Op(Op::Opaque(p))),
    ]
}

/// Layers of up to 8 entries, in the order they are generated, each with a compression.
/// Random hardlink targets would nearly always be missing and every case would end in that
/// error, so a link names something created earlier, which a whiteout or a replacement may
/// still have removed.
fn stack() -> impl Strategy<Value = Vec<(Vec<Op>, Compression)>> {
    let compression = prop::sample::select(vec![
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
    ]);
    prop::collection::vec((prop::collection::vec(op(), 0..=8), compression), 1..=4).prop_map(
        |layers| {
            let mut created: Vec<String> = Vec::new();
            layers
                .into_iter()
                .map(|(ops, c)| {
                    let ops = ops
                        .into_iter()
                        .map(|g| match g {
                            Gen::Op(op) => {
                                if let Op::File(p) | Op::Symlink(p, _) = &op {
                                    created.push(p.clone());
                                }
                                op
                            }
                            Gen::Link(p, _) if created.is_empty() => Op::Hardlink(p.clone(), p),
                            Gen::Link(p, i) => Op::Hardlink(p, i.get(&created).clone()),
                        })
                        .collect();
                    (ops, c)
                })
                .collect()
        },
    )
}

/// The uid that tells entries apart in listings: unique per layer and position.
fn uid(layer: usize, i: usize) -> u64 {
    (layer * 100 + i + 1) as u64
}

fn content(layer: usize, i: usize) -> String {
    format!("L{layer}E{i}")
}

fn to_layer(ops: &[Op], layer_no: usize, c: Compression) -> Layer {
    layer(ops.iter().enumerate().map(|(i, op)| {
        let u = uid(layer_no, i);
        match op {
            Op::File(p) => file(p, content(layer_no, i)).uid(u),
            Op::Dir(p) => dir(p).uid(u),
            Op::Symlink(p, t) => symlink(p, t).uid(u),
            Op::Hardlink(p, t) => hardlink(p, t).uid(u),
            Op::Whiteout(p) => whiteout(p),
            Op::Opaque(d) => opaque(d),
        }
    }))
    .compression(c)
}

// ---------------------------------------------------------------------------------------
// The reference model: a map from path to inode, changed the naive way.

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(String),
    Symlink(String),
}

#[derive(Clone, Debug)]
struct Inode {
    kind: Kind,
    uid: u64,
    mtime: u64,
    /// The layer that made it: only symlinks of the layer being applied are followed.
    layer: usize,
}

#[derive(Default)]
struct Model {
    /// Paths as components, so that map order is rootfs order; the root is implicit.
    names: BTreeMap<Vec<String>, usize>,
    inodes: Vec<Inode>,
}

fn comps(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

impl Model {
    fn is_dir(&self, p: &[String]) -> bool {
        p.is_empty()
            || self
                .names
                .get(p)
                .is_some_and(|&i| matches!(self.inodes[i].kind, Kind::Dir))
    }

    /// Drops `p` and everything under it.
    fn remove(&mut self, p: &[String]) {
        self.names.retain(|k, _| !k.starts_with(p));
    }

    fn add(&mut self, p: Vec<String>, inode: Inode) {
        self.inodes.push(inode);
        self.names.insert(p, self.inodes.len() - 1);
    }

    /// Walks `dirs` from the root as a chrooted extraction of layer `layer_no` would: a
    /// symlink that layer made is followed (`..` stops at the root, `/` starts there again,
    /// at most 40 of them); anything else that is not a directory, or nothing, becomes a
    /// default directory, or with `create` false ends the walk with `None`.
    fn walk(
        &mut self,
        dirs: &[String],
        layer_no: usize,
        create: bool,
    ) -> Result<Option<Vec<String>>, String> {
        let mut todo: Vec<String> = dirs.iter().rev().cloned().collect();
        let mut at: Vec<String> = Vec::new();
        let mut followed = 0;
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => {}
            }
            let mut next = at.clone();
            next.push(c);
            let kind = self.names.get(&next).map(|&i| &self.inodes[i]);
            match kind {
                Some(Inode {
                    kind: Kind::Dir, ..
                }) => at = next,
                Some(Inode {
                    kind: Kind::Symlink(t),
                    layer,
                    ..
                }) if *layer == layer_no => {
                    followed += 1;
                    if followed > 40 {
                        return Err("symbolic links".to_string());
                    }
                    if t.starts_with('/') {
                        at.clear();
                    }
                    todo.extend(t.split('/').rev().map(str::to_string));
                }
                _ if !create => return Ok(None),
                _ => {
                    self.remove(&next);
                    self.add(
                        next.clone(),
                        Inode {
                            kind: Kind::Dir,
                            uid: 0,
                            mtime: 0,
                            layer: layer_no,
                        },
                    );
                    at = next;
                }
            }
        }
        Ok(Some(at))
    }

    /// Where entry `p` of layer `layer_no` lands: its parents walked, its name kept.
    fn place(&mut self, p: &str, layer_no: usize) -> Result<Vec<String>, String> {
        let mut p = comps(p);
        let name = p.pop().expect("entries have a name");
        let mut at = self
            .walk(&p, layer_no, true)?
            .expect("a creating walk ends");
        at.push(name);
        Ok(at)
    }

    /// Applies one generated layer (see [`Model::apply_with`]).
    fn apply(&mut self, ops: &[Op], layer_no: usize) -> Result<(), String> {
        let inodes: Vec<Inode> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| Inode {
                kind: match op {
                    Op::File(_) => Kind::File(content(layer_no, i)),
                    Op::Symlink(_, t) => Kind::Symlink(t.to_string()),
                    _ => Kind::Dir,
                },
                uid: uid(layer_no, i),
                mtime: MTIME,
                layer: layer_no,
            })
            .collect();
        self.apply_with(ops, &inodes, layer_no)
    }

    /// Applies layer `layer_no`, whose entry `i` makes `inodes[i]` (for files, directories
    /// and symlinks): opaque markers and whiteouts first (taken literally), then entries in
    /// order. An error (a hardlink to nothing or to a directory, a symlink loop) is what
    /// flatfs's message must say.
    fn apply_with(&mut self, ops: &[Op], inodes: &[Inode], layer_no: usize) -> Result<(), String> {
        for op in ops {
            if let Op::Opaque(d) = op {
                let d = comps(d);
                if self.is_dir(&d) {
                    self.names
                        .retain(|k, _| !(k.starts_with(&d) && k.len() > d.len()));
                }
            }
        }
        for op in ops {
            if let Op::Whiteout(p) = op {
                self.remove(&comps(p));
            }
        }
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Dir(p) => {
                    let p = self.place(p, layer_no)?;
                    if self.is_dir(&p) {
                        let id = self.names[&p];
                        self.inodes[id] = inodes[i].clone();
                    } else {
                        self.remove(&p);
                        self.add(p, inodes[i].clone());
                    }
                }
                Op::File(p) | Op::Symlink(p, _) => {
                    let p = self.place(p, layer_no)?;
                    self.remove(&p);
                    self.add(p, inodes[i].clone());
                }
                Op::Hardlink(p, t) => {
                    let p = self.place(p, layer_no)?;
                    let mut target = comps(t);
                    let name = target.pop().expect("targets have a name");
                    let found = self.walk(&target, layer_no, false)?.and_then(|mut at| {
                        at.push(name);
                        self.names.get(&at).copied()
                    });
                    let id = match found {
                        None => return Err("hardlink target".to_string()),
                        Some(id) if matches!(self.inodes[id].kind, Kind::Dir) => {
                            return Err("hardlink target".to_string());
                        }
                        Some(id) => id,
                    };
                    self.remove(&p);
                    self.names.insert(p, id);
                }
                Op::Whiteout(_) | Op::Opaque(_) => {}
            }
        }
        Ok(())
    }

    /// The listing `tar_listing` gives for a rootfs export of this tree.
    fn listing(&self) -> String {
        let mut out = String::from(". d 0755 0 0 - - - 0 -\n");
        let mut first: BTreeMap<usize, String> = BTreeMap::new();
        for (p, &id) in &self.names {
            let name = p.join("/");
            let n = &self.inodes[id];
            let attrs = match &n.kind {
                Kind::Dir => format!("d 0755 {} 0 - - - {}", n.uid, n.mtime),
                Kind::File(c) => format!("f 0644 {} 0 {} \"{c}\" - {}", n.uid, c.len(), n.mtime),
                Kind::Symlink(t) => format!("l 0777 {} 0 {} ->{t} - {}", n.uid, t.len(), n.mtime),
            };
            let link = match first.get(&id) {
                Some(f) => format!("=>{f}"),
                None => {
                    if !matches!(n.kind, Kind::Dir) {
                        first.insert(id, name.clone());
                    }
                    "-".to_string()
                }
            };
            let _ = writeln!(out, "{name} {attrs} {link}");
        }
        out
    }
}

// ---------------------------------------------------------------------------------------

fn check_stack(stack: &[(Vec<Op>, Compression)]) {
    let layers: Vec<Layer> = stack
        .iter()
        .enumerate()
        .map(|(n, (ops, c))| to_layer(ops, n, *c))
        .collect();
    let mut model = Model::default();
    let expected = stack
        .iter()
        .enumerate()
        .try_for_each(|(n, (ops, _))| model.apply(ops, n))
        .map(|()| model.listing());

    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("image");
    write_oci_layout(&layers, &default_config(&layers), &image, Some(OCI_REF));
    let rootfs = tmp.path().join("rootfs.tar");
    let res = run_flatfs([
        "export".as_ref(),
        image.as_os_str(),
        "-o".as_ref(),
        rootfs.as_os_str(),
        "--format".as_ref(),
        "rootfs".as_ref(),
    ]);
    let expected = match expected {
        Ok(listing) => listing,
        Err(why) => {
            let stderr = assert_error(&res);
            assert!(
                stderr.contains(&why),
                "the model refuses ({why}); flatfs should say why:\n{stderr}"
            );
            return;
        }
    };
    assert_success(&res);
    let listing = tar_listing(&std::fs::read(&rootfs).expect("read rootfs"));
    assert_listing(&listing, &expected);

    // The flat image, read back, is the same tree.
    let flat = tmp.path().join("flat.oci.tar");
    assert_success(&run_flatfs([
        "export".as_ref(),
        image.as_os_str(),
        "-o".as_ref(),
        flat.as_os_str(),
    ]));
    assert_listing(&rootfs_listing(&flat), &expected);

    // Squashed at every N: the new layer, applied by the model on the model of the first N
    // layers, gives the full merge; and flatfs reads the output back as that tree.
    for keep in 1..=stack.len() {
        let out = tmp.path().join(format!("keep{keep}"));
        crate::squash::export(&image, &out, keep, &["--format", "oci"]);
        assert_listing(&rootfs_listing(&out), &expected);
        let written = crate::squash::read_oci(&out);
        let tar = decompress(written.blobs.last().expect("new layer"));
        // The new layer gets a number of its own: only its own symlinks are followed.
        let (ops, inodes) = parse_layer(&tar, stack.len());
        let mut model = Model::default();
        for (n, (ops, _)) in stack[..keep].iter().enumerate() {
            model.apply(ops, n).expect("the base applied before");
        }
        model
            .apply_with(&ops, &inodes, stack.len())
            .unwrap_or_else(|e| panic!("keep {keep}: the squashed layer does not apply: {e}"));
        assert_listing(&model.listing(), &expected);
    }
}

/// A layer tar as model ops, with the inode each entry makes (the root entry is left out:
/// the model's root never changes).
fn parse_layer(tar: &[u8], layer_no: usize) -> (Vec<Op>, Vec<Inode>) {
    let mut ops = Vec::new();
    let mut inodes = Vec::new();
    for e in raw_entries(tar) {
        let path = String::from_utf8(normalise(&e.name)).expect("utf-8 path");
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (String::new(), path.clone()),
        };
        let inode = |kind| Inode {
            kind,
            uid: e.uid,
            mtime: e.mtime.parse().expect("whole-second mtime"),
            layer: layer_no,
        };
        let sibling = |name: &str| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        let (op, node) = if path.is_empty() {
            continue;
        } else if base == ".wh..wh..opq" {
            (Op::Opaque(dir.clone()), inode(Kind::Dir))
        } else if let Some(name) = base.strip_prefix(".wh.") {
            (Op::Whiteout(sibling(name)), inode(Kind::Dir))
        } else {
            match e.typeflag {
                b'5' => (Op::Dir(path), inode(Kind::Dir)),
                b'0' => (
                    Op::File(path),
                    inode(Kind::File(
                        String::from_utf8(e.data.clone()).expect("utf-8"),
                    )),
                ),
                b'2' => (
                    Op::Symlink(path, ""),
                    inode(Kind::Symlink(
                        String::from_utf8(e.link.clone()).expect("utf-8"),
                    )),
                ),
                b'1' => (
                    Op::Hardlink(path, String::from_utf8(normalise(&e.link)).expect("utf-8")),
                    inode(Kind::Dir),
                ),
                other => panic!("unexpected entry type {}", char::from(other)),
            }
        };
        ops.push(op);
        inodes.push(node);
    }
    (ops, inodes)
}

proptest! {
    // Each case runs flatfs three times; 64 keep the suite quick. More, for a while:
    //   PROPTEST_CASES=2000 cargo test --release --test it props::
    // (read here: `with_cases` alone would override the variable proptest reads itself).
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn merged_tree_matches_the_naive_model_and_survives_reimport(stack in stack()) {
        check_stack(&stack);
    }
}

/// Cases the property test found or that pin a rule it exercises, kept as plain tests.
#[test]
fn model_cases() {
    use Op::*;
    let s = |x: &str| x.to_string();
    for stack in [
        // A hardlink whose name is the parent of its target.
        vec![(
            vec![File(s("a/b")), Hardlink(s("a"), s("a/b"))],
            Compression::None,
        )],
        // A hardlink to a file that an ancestor of the link's own name replaces.
        vec![(
            vec![File(s("a")), Hardlink(s("a/b"), s("a"))],
            Compression::None,
        )],
        // An opaque root, then a whiteout of what the same layer adds.
        vec![
            (vec![File(s("a")), Dir(s("b"))], Compression::Gzip),
            (
                vec![File(s("b/c")), Opaque(s("")), Whiteout(s("b"))],
                Compression::Zstd,
            ),
        ],
        // A symlink over a directory, then an entry through it: lands in /etc.
        vec![
            (vec![Dir(s("a")), File(s("a/b"))], Compression::None),
            (
                vec![Symlink(s("a"), "/etc"), File(s("a/c"))],
                Compression::None,
            ),
        ],
        // An entry through a lower symlink, and through a same-layer one climbing past the
        // root; a hardlink whose target runs through it.
        vec![
            (vec![Symlink(s("a"), "b/c")], Compression::None),
            (
                vec![
                    File(s("a/b")),
                    Symlink(s("c"), "../.."),
                    File(s("c/a/x")),
                    Hardlink(s("b"), s("c/a/x")),
                ],
                Compression::Gzip,
            ),
        ],
        // A loop.
        vec![(
            vec![Symlink(s("a"), "b/c"), Symlink(s("b"), "a"), File(s("b/x"))],
            Compression::None,
        )],
    ] {
        check_stack(&stack);
    }
}
