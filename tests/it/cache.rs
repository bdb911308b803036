//! The merged-tree cache (issue 4): a second open of an image loads its merged tree from one
//! file instead of indexing and merging again. A hit must give the very tree a fresh merge gives;
//! a corrupt, truncated, stale or lying file must be ignored and rebuilt; a different layer
//! selection must never get another selection's tree.

use std::fs;
use std::path::{Path, PathBuf};

use flatfs::cache::{Cache, CacheKind};
use flatfs::tree::listing;
use flatfs::{IndexOptions, Opened};
use tempfile::TempDir;

use crate::util::*;

/// Three layers, gzip, zstd and plain, with every kind of node, xattrs and overlay rules.
fn image(at: &Path) -> PathBuf {
    let layers = vec![
        layer([
            dir("etc"),
            file("etc/passwd", "root:x:0:0\n").xattr("user.a", b"\x00\xff"),
            file("etc/gone", "x"),
            symlink("lib", "usr/lib"),
            hardlink("etc/passwd-", "etc/passwd"),
            chardev("dev/null", 1, 3),
            fifo("run/fifo"),
            file("big", noise(7, 3 << 20)),
        ])
        .compression(Compression::Gzip),
        layer([
            whiteout("etc/gone"),
            file("etc/new", "new").xattr("security.capability", b"\x01"),
            file("usr/lib/libc.so", "elf"),
        ])
        .compression(Compression::Zstd),
        layer([
            opaque("usr"),
            file("usr/only", "top"),
            blockdev("dev/sda", 8, 0),
        ]),
    ];
    let path = at.join("image");
    write_oci_layout(&layers, &default_config(&layers), &path, None);
    path
}

fn open(image: &Path, cache: Option<&Cache>, layers: Option<usize>) -> Opened {
    flatfs::open_merged_with(
        image.to_str().expect("utf-8 path"),
        None,
        &IndexOptions {
            cache,
            layers,
            ..IndexOptions::default()
        },
    )
    .expect("open image")
}

fn files_with(cache: &Cache, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cache.dir())
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// Every name of a tree with everything the tree says about it, xattrs included.
fn full_listing(opened: &Opened) -> String {
    let tree = &opened.tree;
    let mut out = listing(tree);
    tree.walk(|path, id, _| {
        let n = tree.node(id);
        out.push_str(&format!(
            "{} {:?} {} {}\n",
            String::from_utf8_lossy(path),
            n.xattrs,
            n.parent,
            n.layer
        ));
        Ok(())
    })
    .expect("walk");
    out
}

#[test]
fn a_cache_hit_gives_the_tree_a_fresh_merge_gives() {
    let tmp = TempDir::new().expect("tempdir");
    let image = image(tmp.path());
    let fresh = open(&image, None, None);
    let cache = Cache::new(tmp.path().join("cache"));
    let cold = open(&image, Some(&cache), None);
    assert_eq!(full_listing(&cold), full_listing(&fresh));
    let trees = files_with(&cache, "tree");
    assert_eq!(trees.len(), 1, "{trees:?}");

    // Spoil the layer indexes' bodies (their last byte is the body's checksum): a tree hit
    // needs only their heads, for the gzip checkpoints, and leaves them alone.
    let indexes = files_with(&cache, "idx");
    assert_eq!(indexes.len(), 3);
    for p in &indexes {
        let mut b = fs::read(p).expect("read");
        *b.last_mut().expect("not empty") ^= 1;
        fs::write(p, b).expect("write");
    }
    let before: Vec<Vec<u8>> = indexes.iter().map(|p| fs::read(p).expect("read")).collect();
    let warm = open(&image, Some(&cache), None);
    assert_eq!(full_listing(&warm), full_listing(&fresh));
    assert_eq!(warm.tree, fresh.tree, "the arenas differ");
    assert_eq!(warm.checkpoints, fresh.checkpoints);
    assert!(
        warm.checkpoints[0].is_some(),
        "the gzip layer has checkpoints"
    );
    let after: Vec<Vec<u8>> = indexes.iter().map(|p| fs::read(p).expect("read")).collect();
    assert!(
        before == after,
        "the layers were indexed again: no tree hit"
    );

    // Reads through the cached tree's checkpoints give the layer's bytes.
    let mut buf = vec![0; 11];
    let id = warm.tree.resolve(b"etc/passwd").expect("etc/passwd");
    let flatfs::tree::NodeKind::File(extent) = warm.tree.node(id).kind else {
        panic!("not a file");
    };
    let n = warm.content().read_at(&extent, 0, &mut buf).expect("read");
    assert_eq!(&buf[..n], b"root:x:0:0\n");
}

#[test]
fn corrupt_truncated_stale_or_lying_tree_files_are_rebuilt() {
    let tmp = TempDir::new().expect("tempdir");
    let image = image(tmp.path());
    let fresh = full_listing(&open(&image, None, None));
    let cache = Cache::new(tmp.path().join("cache"));
    open(&image, Some(&cache), None);
    let path = files_with(&cache, "tree").remove(0);
    let good = fs::read(&path).expect("tree file");

    // The file ends with a CRC-32 of the rest.
    let reseal = |mut b: Vec<u8>| {
        b.truncate(b.len() - 4);
        let sum = crc32fast::hash(&b).to_le_bytes();
        b.extend_from_slice(&sum);
        b
    };
    let mut stale = good.clone();
    stale[8..12].copy_from_slice(&1u32.to_le_bytes());
    // Well-formed files whose trees lie: the last name (`usr/only`'s `only`, just before the
    // checksum) made a path or a whiteout. `cache::merged` tests the other lies.
    let renamed = |name: &[u8; 4]| {
        let mut b = good.clone();
        let at = b.len() - 4 - 4;
        b[at..at + 4].copy_from_slice(name);
        reseal(b)
    };
    let mut cases = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("stale", reseal(stale)),
        ("slash", renamed(b"a/bc")),
        ("whiteout", renamed(b".wh.")),
    ];
    for i in (0..good.len()).step_by(good.len() / 40) {
        let mut b = good.clone();
        b[i] ^= 0x10;
        cases.push(("flipped", b));
    }
    for (what, bad) in cases {
        fs::write(&path, &bad).expect("write bad tree file");
        let opened = open(&image, Some(&cache), None);
        assert_eq!(full_listing(&opened), fresh, "{what}: the tree differs");
        assert!(
            fs::read(&path).expect("tree file") == good,
            "{what}: the tree file was not rebuilt"
        );
    }
}

#[test]
fn each_layer_selection_has_its_own_tree() {
    let tmp = TempDir::new().expect("tempdir");
    let image = image(tmp.path());
    let cache = Cache::new(tmp.path().join("cache"));
    for round in ["cold", "warm"] {
        for n in [1, 2, 3] {
            let got = full_listing(&open(&image, Some(&cache), Some(n)));
            let want = full_listing(&open(&image, None, Some(n)));
            assert_eq!(got, want, "{round}: --layers {n}");
        }
        assert_eq!(files_with(&cache, "tree").len(), 3, "{round}");
    }
    // All layers and `--layers 3` are the same stack, so the same tree.
    open(&image, Some(&cache), None);
    assert_eq!(files_with(&cache, "tree").len(), 3);
    let list = cache.list().expect("list");
    let trees: Vec<_> = list
        .iter()
        .filter(|e| e.kind == CacheKind::MergedTree)
        .collect();
    assert_eq!(trees.len(), 3);
    assert!(trees.iter().all(|e| e.entries.is_some_and(|n| n > 1)));
    cache.clear().expect("clear");
    assert!(cache.list().expect("list").is_empty());
}

#[test]
fn a_changed_blob_file_is_not_served_an_old_tree() {
    let tmp = TempDir::new().expect("tempdir");
    let image = image(tmp.path());
    let cache = Cache::new(tmp.path().join("cache"));
    let first = full_listing(&open(&image, Some(&cache), None));
    // The same bytes in a new file (another inode): the tree holds only once they are checked.
    for entry in fs::read_dir(image.join("blobs/sha256")).expect("blobs") {
        let p = entry.expect("entry").path();
        let bytes = fs::read(&p).expect("read");
        fs::remove_file(&p).expect("remove");
        fs::write(&p, bytes).expect("write");
    }
    let tree_file = files_with(&cache, "tree").remove(0);
    let old = fs::read(&tree_file).expect("tree file");
    assert_eq!(full_listing(&open(&image, Some(&cache), None)), first);
    assert!(
        fs::read(&tree_file).expect("tree file") != old,
        "the tree was used though its blob files changed"
    );
}
