//! `flatfs export --keep N` (issue 13): the bottom N layers kept byte-identical, the rest
//! replaced by one layer holding the change. For every N of images built here: the output's
//! merged tree equals the input's (flatfs's own rootfs export of the output, and `umoci
//! unpack`), the kept blobs are the input's files with the input's descriptors, the config
//! keeps their diff_ids and history, and the new layer holds what `flatfs diff --from N`
//! lists and nothing that the rules (src/squash.rs) do not call for.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::util::*;

/// Two base layers, then three that touch every rule: a deleted directory, a directory
/// mostly replaced (one of whose files has a hardlink outside it), type changes both ways, a metadata-only change, an xattr change, a new
/// name for a base file, a removed name of a base hardlink pair, something added and
/// removed again above the base, a directory whose metadata alone changes.
fn sample() -> Vec<Layer> {
    let mut base = vec![
        dir("etc"),
        file("etc/passwd", "root:x:0:0"),
        file("etc/group", "root:x:0:"),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/tool", "#!tool").mode(0o755),
        dir("lib"),
        file("lib/keep.so", "keep"),
        hardlink("lib-link", "lib/keep.so"),
        file("hl", "linked"),
        hardlink("hl2", "hl"),
        dir("data").mode(0o700).uid(7),
        file("data/x", "x"),
        symlink("cur", "data"),
        dir("gone"),
        dir("gone/sub"),
        file("gone/sub/deep", "deep"),
        file("gone/top", "top"),
        file("will-be-dir", "f"),
        dir("will-be-file"),
        file("will-be-file/child", "c"),
        dir("will-be-link"),
        file("will-be-link/child", "c"),
        file("meta", "m"),
        file("xa", "xa"),
        file("link-target", "target bytes"),
    ];
    base.extend((0..12).map(|i| file(format!("lib/old{i}.so"), format!("old {i}"))));
    let mut replace_lib: Vec<Entry> = (0..12)
        .map(|i| whiteout(format!("lib/old{i}.so")))
        .collect();
    replace_lib.push(file("lib/new.so", "new"));
    replace_lib.extend([
        whiteout("gone"),
        dir("will-be-dir"),
        file("will-be-dir/inside", "i"),
        file("will-be-file", "now a file"),
        symlink("will-be-link", "/etc"),
        file("meta", "m").mode(0o600),
        hardlink("new-link", "link-target"),
        whiteout("hl2"),
    ]);
    vec![
        layer(base),
        layer([
            file("etc/hostname", "box"),
            dir("opt").mode(0o750).uid(5),
            file("opt/app", "app"),
        ])
        .compression(Compression::None),
        layer(replace_lib),
        layer([
            file("xa", "xa").xattr("user.note", "v"),
            dir("data").mode(0o755).uid(7),
            file("etc/passwd", "root:x:0:0\nuser:x:1:1"),
            file("tmp/scratch", "s"),
        ]),
        layer([
            whiteout("tmp"),
            file("usr/bin/tool2", "#!tool2").mode(0o755),
        ]),
    ]
}

/// An OCI layout of `layers` whose layer descriptors carry annotations, which `--keep` must
/// carry over as they are.
fn annotated_layout(layers: &[Layer], dir: &Path) -> Vec<Value> {
    let mut oci = OciLayout::new();
    let blobs: Vec<Blob> = layers.iter().map(|l| l.blob(Compression::Gzip)).collect();
    let mut config = default_config(layers);
    config["rootfs"]["diff_ids"] = json!(blobs.iter().map(|b| &b.diff_id).collect::<Vec<_>>());
    let config_desc = oci.add_blob(MT_OCI_CONFIG, serde_json::to_vec(&config).expect("json"));
    let descs: Vec<Value> = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let desc = oci.add_blob(&b.media_type, b.bytes.clone());
            with_annotations(desc, &[("org.example.layer", &format!("n{i}"))])
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config_desc,
        "layers": descs,
    });
    let desc = oci.add_blob(
        MT_OCI_MANIFEST,
        serde_json::to_vec(&manifest).expect("json"),
    );
    oci.add_index_entry(with_annotations(
        desc,
        &[("org.opencontainers.image.ref.name", OCI_REF)],
    ));
    oci.write_dir(dir);
    descs
}

/// An image as written: manifest layer descriptors, the blobs they name, the config.
pub(crate) struct Image {
    descriptors: Vec<Value>,
    pub(crate) blobs: Vec<Vec<u8>>,
    config: Value,
}

fn read_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

/// Reads an OCI layout directory's only image.
pub(crate) fn read_oci(dir: &Path) -> Image {
    let blob = |digest: &str| {
        std::fs::read(
            dir.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("blob")
    };
    let index = read_json(&std::fs::read(dir.join("index.json")).expect("index"));
    let manifest = read_json(&blob(
        index["manifests"][0]["digest"].as_str().expect("digest"),
    ));
    let descriptors = manifest["layers"].as_array().expect("layers").clone();
    Image {
        blobs: descriptors
            .iter()
            .map(|d| blob(d["digest"].as_str().expect("digest")))
            .collect(),
        config: read_json(&blob(
            manifest["config"]["digest"].as_str().expect("digest"),
        )),
        descriptors,
    }
}

/// Reads a docker archive: its layer members by position (descriptors are empty).
fn read_docker(path: &Path) -> Image {
    let files = tar_files(&std::fs::read(path).expect("read archive"));
    let manifest = read_json(&files["manifest.json"]);
    let entry = &manifest[0];
    Image {
        blobs: entry["Layers"]
            .as_array()
            .expect("Layers")
            .iter()
            .map(|l| files[l.as_str().expect("name")].clone())
            .collect(),
        config: read_json(&files[entry["Config"].as_str().expect("Config")]),
        descriptors: Vec::new(),
    }
}

pub(crate) fn export(image: &Path, out: &Path, keep: usize, extra: &[&str]) -> String {
    let keep = keep.to_string();
    let mut args: Vec<&OsStr> = vec![
        "export".as_ref(),
        image.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--keep".as_ref(),
        keep.as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let res = run_flatfs(&args);
    assert_success(&res);
    stderr_of(&res)
}

/// `flatfs diff --from N --to M`: `(op, path)` pairs.
fn diff(image: &Path, from: usize, to: usize) -> Vec<(char, String)> {
    let (from, to) = (from.to_string(), to.to_string());
    let res = run_flatfs([
        "diff".as_ref(),
        image.as_os_str(),
        "--from".as_ref(),
        OsStr::new(&from),
        "--to".as_ref(),
        OsStr::new(&to),
    ]);
    assert_success(&res);
    String::from_utf8_lossy(&res.stdout)
        .lines()
        .map(|l| {
            let op = l.chars().next().expect("op");
            let path = l.split_whitespace().nth(2).expect("path").to_string();
            (op, path)
        })
        .collect()
}

fn parent(p: &str) -> Option<&str> {
    match p.rsplit_once('/') {
        Some((d, _)) => Some(d),
        None if p == "." => None,
        None => Some("."),
    }
}

fn ancestors(p: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut cur = p;
    while let Some(d) = parent(cur) {
        out.push(d);
        cur = d;
    }
    out
}

/// Checks the new layer against `flatfs diff --from keep --to top`: every added or modified
/// path is written; every deleted path is covered by a whiteout of itself or an ancestor, an
/// ancestor written as a non-directory, or an opaque ancestor; and everything else written
/// is a directory on the way to something written, a name of a hardlink group the layer
/// writes, or under an opaque directory. Returns the number of names written.
fn check_layer(tar: &[u8], changes: &[(char, String)]) -> usize {
    let mut names: BTreeMap<String, u8> = BTreeMap::new();
    let mut whiteouts = BTreeSet::new();
    let mut opaque = BTreeSet::new();
    let mut links: Vec<(String, String)> = Vec::new();
    for e in raw_entries(tar) {
        let p = String::from_utf8(normalise(&e.name)).expect("utf-8");
        let p = if p.is_empty() { ".".to_string() } else { p };
        let (dir, base) = match p.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (".".to_string(), p.clone()),
        };
        let join = |name: &str| {
            if dir == "." {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        if base == ".wh..wh..opq" {
            opaque.insert(dir.clone());
        } else if let Some(name) = base.strip_prefix(".wh.") {
            whiteouts.insert(join(name));
        } else {
            assert!(names.insert(p.clone(), e.typeflag).is_none(), "{p} twice");
            if e.typeflag == b'1' {
                let target = String::from_utf8(normalise(&e.link)).expect("utf-8");
                assert!(names.contains_key(&target), "{p} links outside the layer");
                links.push((p, target));
            }
        }
    }
    let changed: BTreeSet<&str> = changes
        .iter()
        .filter(|(op, _)| *op != '-')
        .map(|(_, p)| p.as_str())
        .collect();
    let deleted: BTreeSet<&str> = changes
        .iter()
        .filter(|(op, _)| *op == '-')
        .map(|(_, p)| p.as_str())
        .collect();
    for p in &changed {
        assert!(
            names.contains_key(*p),
            "changed {p} not in the layer: {names:?}"
        );
    }
    for p in &deleted {
        let covered = whiteouts.contains(*p)
            || ancestors(p).iter().any(|a| {
                whiteouts.contains(*a)
                    || opaque.contains(*a)
                    || names.get(*a).is_some_and(|t| *t != b'5')
            });
        assert!(covered, "deleted {p} is not removed by the layer");
    }
    for w in &whiteouts {
        assert!(
            deleted.contains(w.as_str()),
            "whiteout of {w}, which was not deleted"
        );
        let p = parent(w).expect("parent");
        assert!(
            !deleted.contains(p),
            "whiteout of {w} inside an already deleted directory"
        );
    }
    for o in &opaque {
        assert_eq!(
            names.get(o),
            Some(&b'5'),
            "opaque {o} without its directory"
        );
    }
    let written: Vec<&str> = names
        .keys()
        .map(String::as_str)
        .chain(whiteouts.iter().map(String::as_str))
        .collect();
    for (p, t) in &names {
        let needed = changed.contains(p.as_str())
            || (*t == b'5' && written.iter().any(|w| ancestors(w).contains(&p.as_str())))
            || (*t == b'5' && opaque.contains(p))
            || links.iter().any(|(a, b)| a == p || b == p)
            || ancestors(p).iter().any(|a| opaque.contains(*a));
        assert!(needed, "{p} is in the layer but nothing calls for it");
    }
    names.len()
}

/// The canonical listing of an image's merged tree as `umoci unpack` builds it. Needs umoci,
/// root and ../shared/tools: only `#[ignore]`d tests call it, so a missing piece fails.
fn umoci_listing(layout: &Path) -> String {
    let tools = shared_tools_dir();
    let have_umoci = Command::new("umoci").arg("--version").output().is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        have_umoci && root && tools.join("tree-manifest.py").exists(),
        "the umoci check needs umoci, root and ../shared/tools (FLATFS_SHARED_DIR)"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let bundle = tmp.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{OCI_REF}", layout.display()))
        .arg(&bundle)
        .output()
        .expect("run umoci");
    assert!(out.status.success(), "umoci unpack: {}", stderr_of(&out));
    let out = Command::new("python3")
        .arg(tools.join("tree-manifest.py"))
        .arg("--hardlinks")
        .arg(bundle.join("rootfs"))
        .output()
        .expect("run tree-manifest.py");
    assert!(
        out.status.success(),
        "tree-manifest.py: {}",
        stderr_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// For every N: OCI layout in and out, the output's tree (flatfs's, and umoci's when asked:
/// umoci reads no zstd) is the input's, kept descriptors and blobs are the input's, and the
/// new layer is the change.
fn check_every_keep(layers: &[Layer], umoci: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in");
    let descs = annotated_layout(layers, &input);
    let want = rootfs_listing(&input);
    let want_umoci = umoci.then(|| umoci_listing(&input));
    let original = read_oci(&input);
    let top = layers.len();
    for keep in 0..=top {
        let out = tmp.path().join(format!("keep{keep}"));
        export(&input, &out, keep, &["--format", "oci"]);
        assert_listing(&rootfs_listing(&out), &want);
        if let Some(want) = &want_umoci {
            assert_eq!(&umoci_listing(&out), want, "keep {keep}: umoci");
        }
        let got = read_oci(&out);
        assert_eq!(got.descriptors.len(), keep + 1, "keep {keep}");
        assert_eq!(got.descriptors[..keep], descs[..keep], "keep {keep}");
        assert_eq!(got.blobs[..keep], original.blobs[..keep], "keep {keep}");
        let ids = |c: &Value| c["rootfs"]["diff_ids"].as_array().expect("ids").clone();
        assert_eq!(ids(&got.config)[..keep], ids(&original.config)[..keep]);
        // History: the ENV entry and the kept layers' entries as they were, the rest empty,
        // one new entry last.
        let history = got.config["history"].as_array().expect("history");
        let before = original.config["history"].as_array().expect("history");
        assert_eq!(history.len(), before.len() + 1);
        for (i, (h, b)) in history.iter().zip(before).enumerate() {
            if i <= keep {
                assert_eq!(h, b, "keep {keep}: history {i}");
            } else {
                assert_eq!(h["empty_layer"], json!(true), "keep {keep}: history {i}");
                assert_eq!(h["created_by"], b["created_by"]);
            }
        }
        let new = history.last().expect("new entry")["created_by"]
            .as_str()
            .expect("created_by");
        if keep > 0 {
            assert!(new.contains(&format!("kept {keep} layers")), "{new}");
            let tar = decompress(got.blobs.last().expect("new layer"));
            let written = check_layer(&tar, &diff(&input, keep, top));
            if keep == top {
                assert_eq!(written, 0, "nothing above the base: an empty layer");
                assert_eq!(tar, vec![0; 1024]);
            }
        }
    }
}

#[test]
fn every_keep_of_the_sample_gives_the_same_tree_and_keeps_the_base() {
    check_every_keep(&sample(), false);
}

#[test]
#[ignore = "needs root, umoci and ../shared/tools: scripts/test.sh runs it with the oracle tests"]
fn every_keep_of_the_sample_unpacks_with_umoci_as_the_input_does() {
    check_every_keep(&sample(), true);
}

#[test]
fn every_keep_of_the_export_fixture_gives_the_same_tree() {
    // Hardlinks whose target goes away, an implicit parent, big ids, sub-second times, zstd
    // and plain layers kept as they are.
    let layers = vec![
        layer([
            dir("etc"),
            file("etc/passwd", "root:x:0:0"),
            file("a", "data"),
            hardlink("b", "a"),
            file("owned", "o").uid(3_000_000).gid(3_000_000),
        ])
        .compression(Compression::Zstd),
        layer([whiteout("a"), file("var/log/app.log", "log")]).compression(Compression::None),
        layer([
            hardlink("c", "b"),
            file("message.txt", "Hello").mtime_ns(1_700_000_000, 5),
        ]),
    ];
    check_every_keep(&layers, false);
}

#[test]
fn the_plan_for_the_sample_is_minimal() {
    // Keep 2: the exact layer, so a rule change shows up here first.
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in");
    write_oci_layout(&sample(), &default_config(&sample()), &input, Some(OCI_REF));
    let out = tmp.path().join("out");
    let stderr = export(&input, &out, 2, &["--format", "oci"]);
    assert!(stderr.contains("kept 2 layers"), "{stderr}");
    let tar = decompress(read_oci(&out).blobs.last().expect("layer"));
    let names: Vec<String> = raw_entries(&tar)
        .iter()
        .map(|e| {
            let n = String::from_utf8(normalise(&e.name)).expect("utf-8");
            if e.typeflag == b'1' {
                format!("{n} => {}", String::from_utf8_lossy(&normalise(&e.link)))
            } else {
                n
            }
        })
        .collect();
    assert_eq!(
        names,
        [
            "",
            // Twelve whiteouts cost more than rewriting `keep.so`: opaque.
            ".wh.gone",
            ".wh.hl2",
            "data",
            "etc",
            "etc/passwd",
            "lib",
            "lib/.wh..wh..opq",
            "lib/keep.so",
            "lib/new.so",
            // Rewritten with `lib/keep.so`, whose link it is.
            "lib-link => lib/keep.so",
            // A new name for a base file: both names, the first as the file.
            "link-target",
            "meta",
            "new-link => link-target",
            "usr",
            "usr/bin",
            "usr/bin/tool2",
            "will-be-dir",
            "will-be-dir/inside",
            "will-be-file",
            "will-be-link",
            "xa",
        ]
    );
}

#[test]
fn docker_archive_keeps_the_layer_tars_and_loads_as_the_same_tree() {
    let layers = sample();
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &input);
    let original = read_docker(&input);
    let want = rootfs_listing(&input);
    for keep in 1..=layers.len() {
        let out = tmp.path().join(format!("k{keep}.tar"));
        export(&input, &out, keep, &[]);
        let got = read_docker(&out);
        assert_eq!(got.blobs.len(), keep + 1);
        assert_eq!(got.blobs[..keep], original.blobs[..keep], "keep {keep}");
        assert_listing(&rootfs_listing(&out), &want);
        // The same image as an OCI archive: docker-archive layers get OCI descriptors.
        let oci = tmp.path().join(format!("k{keep}.oci.tar"));
        export(&input, &oci, keep, &["--format", "oci-archive"]);
        assert_listing(&rootfs_listing(&oci), &want);
    }
}

#[test]
fn output_is_deterministic() {
    let layers = sample();
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in.oci.tar");
    write_oci_archive(&layers, &default_config(&layers), &input);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    export(&input, &a, 3, &[]);
    export(&input, &b, 3, &["--compression", "gzip"]);
    assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
}

#[test]
fn bad_keep_values_fail_cleanly() {
    let layers = sample();
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in");
    write_oci_layout(&layers, &default_config(&layers), &input, Some(OCI_REF));
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let out = out_dir.join("x.tar");
    for (keep, format, why) in [
        ("6", "oci-archive", "--keep must be 0..=5"),
        ("1", "rootfs", "rootfs"),
    ] {
        let res = run_flatfs([
            "export".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--keep".as_ref(),
            OsStr::new(keep),
            "--format".as_ref(),
            OsStr::new(format),
        ]);
        let stderr = assert_error(&res);
        assert!(stderr.contains(why), "{stderr}");
        assert_empty_dir(&out_dir);
    }
}

/// The tools dir and a podman configuration (make-images.sh's settings: runc, cgroupfs, no
/// network, explicit rlimits, storage in `dir`). Only an `#[ignore]`d test calls it, so a
/// missing piece fails.
pub(crate) fn podman_setup(dir: &Path) -> (PathBuf, Vec<(String, PathBuf)>) {
    let tools = shared_tools_dir();
    let have = |c: &str| Command::new(c).arg("--version").output().is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["podman", "skopeo", "umoci", "runc", "python3"]
        .into_iter()
        .filter(|c| !have(c))
        .chain((!root).then_some("root"))
        .chain((!tools.join("make-images.sh").exists()).then_some("../shared/tools"))
        .collect();
    assert!(
        missing.is_empty(),
        "the podman test needs: {}",
        missing.join(", ")
    );
    let driver = if std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|f| f.split_whitespace().any(|w| w == "overlay"))
    {
        "overlay"
    } else {
        "vfs"
    };
    let containers = dir.join("containers.conf");
    let storage = dir.join("storage.conf");
    std::fs::write(
        &containers,
        "[containers]\nnetns = \"none\"\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n",
    )
    .expect("containers.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"{driver}\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
            dir.join("run").display(),
            dir.join("graph").display()
        ),
    )
    .expect("storage.conf");
    (
        tools,
        vec![
            ("CONTAINERS_CONF".to_string(), containers),
            ("CONTAINERS_STORAGE_CONF".to_string(), storage),
        ],
    )
}

pub(crate) fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        stderr_of(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The real busybox `hello` image of make-images.sh, squashed above its base layer: podman
/// loads and runs it, its overlay storage shows the same tree as `umoci unpack` of the input,
/// and skopeo copies of input and output share the base blob, byte for byte.
#[test]
#[ignore = "needs root, podman, skopeo and ../shared/tools: scripts/test.sh runs it with the oracle tests"]
fn podman_runs_a_kept_base_image_and_skopeo_sees_the_base_blob_shared() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (tools, env) = podman_setup(tmp.path());
    let images = tmp.path().join("images");
    run_tool(
        Command::new(tools.join("make-images.sh"))
            .arg(&images)
            .arg("hello"),
    );
    let podman = || {
        let mut c = Command::new("podman");
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    };

    let out = tmp.path().join("k1.docker.tar");
    let tag = "localhost/flatfs-squash-test:k1";
    export(&images.join("hello.docker.tar"), &out, 1, &["--tag", tag]);
    run_tool(podman().args(["load", "-q", "-i"]).arg(&out));
    let said = run_tool(podman().args(["run", "--rm", "--pull", "never", tag]));
    assert_eq!(said.trim(), "Hello, World!");
    let mounted = run_tool(podman().args(["image", "mount", tag]));
    let listing = run_tool(
        Command::new("python3")
            .arg(tools.join("tree-manifest.py"))
            .arg("--hardlinks")
            .arg(mounted.trim()),
    );
    run_tool(podman().args(["image", "unmount", tag]));
    run_tool(podman().args(["rmi", "-f", tag]));
    // podman's image mount shows its own root directory: compare below it.
    let below_root = |l: &str| -> String {
        l.lines()
            .filter(|l| !l.starts_with(".\t"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let want = std::fs::read_to_string(images.join("hello.expected.txt")).expect("expected");
    assert_eq!(below_root(&listing), below_root(&want));

    // The OCI output copied into a `dir:` next to the input: the base blob is the same file.
    let oci = tmp.path().join("k1.oci.tar");
    export(&images.join("hello"), &oci, 1, &[]);
    let (a, b) = (tmp.path().join("in-dir"), tmp.path().join("out-dir"));
    run_tool(
        Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci:{}:latest", images.join("hello").display()))
            .arg(format!("dir:{}", a.display())),
    );
    run_tool(
        Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci-archive:{}", oci.display()))
            .arg(format!("dir:{}", b.display())),
    );
    let layers = |d: &Path| -> Vec<String> {
        read_json(&std::fs::read(d.join("manifest.json")).expect("manifest"))["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("digest").to_string())
            .collect()
    };
    let (la, lb) = (layers(&a), layers(&b));
    assert_eq!((la.len(), lb.len()), (3, 2));
    assert_eq!(la[0], lb[0], "the base layer's digest");
    let blob = |d: &Path, digest: &str| {
        std::fs::read(d.join(digest.trim_start_matches("sha256:"))).expect("blob file")
    };
    assert_eq!(blob(&a, &la[0]), blob(&b, &lb[0]), "the base blob's bytes");
}

/// The three ways to name the base give the same bytes; `inspect` finds the base from the
/// history (a `CMD` with layers after it) and says which `--keep` keeps it.
#[test]
fn keep_until_keep_base_and_the_inspect_hint_agree() {
    let layers = sample();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = default_config(&layers);
    let history = config["history"].as_array_mut().expect("history");
    // ENV, layer 1, layer 2, then the base's CMD, then layers 3-5.
    history.insert(
        3,
        json!({"created_by": "/bin/sh -c #(nop)  CMD [\"sh\"]", "empty_layer": true}),
    );
    let input = tmp.path().join("app");
    let written = write_oci_layout(&layers, &config, &input, Some(OCI_REF));
    let base = tmp.path().join("base");
    write_oci_layout(
        &layers[..2],
        &default_config(&layers[..2]),
        &base,
        Some(OCI_REF),
    );

    let res = run_flatfs(["inspect".as_ref(), input.as_os_str()]);
    assert_success(&res);
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(text.contains("--keep 2"), "{text}");
    let res = run_flatfs(["inspect".as_ref(), "--json".as_ref(), input.as_os_str()]);
    assert_success(&res);
    assert_eq!(read_json(&res.stdout)["base"]["keep"], json!(2));

    let by_number = tmp.path().join("n.tar");
    export(&input, &by_number, 2, &[]);
    let want = std::fs::read(&by_number).expect("read");
    let prefix = &written.layer_digests[1]["sha256:".len()..][..12];
    let diff_id = written.diff_ids[1].clone();
    for args in [
        vec!["--keep-until", prefix],
        vec!["--keep-until", &diff_id],
        vec!["--keep-base", base.to_str().expect("utf-8")],
    ] {
        let out = tmp.path().join("o.tar");
        let mut all: Vec<&OsStr> = vec![
            "export".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ];
        all.extend(args.iter().map(OsStr::new));
        assert_success(&run_flatfs(&all));
        assert!(std::fs::read(&out).expect("read") == want, "{args:?}");
    }
    // Not the base: the app image does not start with the sample's layer 3 alone.
    let other = tmp.path().join("other");
    write_oci_layout(
        &layers[2..3],
        &default_config(&layers[2..3]),
        &other,
        Some(OCI_REF),
    );
    for (flag, value, why) in [
        (
            "--keep-base",
            other.to_str().expect("utf-8"),
            "does not start with the layers",
        ),
        ("--keep-until", "0000000000", "no layer"),
        ("--keep-until", "zz", "hex"),
    ] {
        let res = run_flatfs([
            "export".as_ref(),
            input.as_os_str(),
            "-o".as_ref(),
            tmp.path().join("bad.tar").as_os_str(),
            flag.as_ref(),
            value.as_ref(),
        ]);
        let stderr = assert_error(&res);
        assert!(stderr.contains(why), "{flag} {value}: {stderr}");
    }
    // Two ways at once is a usage error.
    let res = run_flatfs([
        "export".as_ref(),
        input.as_os_str(),
        "-o".as_ref(),
        tmp.path().join("bad.tar").as_os_str(),
        "--keep".as_ref(),
        "1".as_ref(),
        "--keep-base".as_ref(),
        base.as_os_str(),
    ]);
    assert_eq!(res.status.code(), Some(2), "{}", stderr_of(&res));
}

/// Sparse files on both sides of the cut: one in a kept layer that a new hardlink makes the
/// squashed layer rewrite (its bytes read from the kept layer), one in a squashed layer.
#[test]
fn sparse_files_above_and_below_the_cut() {
    let layers = vec![
        layer([
            gnu_sparse("base.img", 1 << 20, &[(0, b"head"), (700_000, b"middle")]),
            file("other", "o"),
        ]),
        layer([
            hardlink("base-link", "base.img"),
            gnu_sparse("new.img", 3 << 20, &[(2 << 20, b"tail")]),
        ])
        .compression(Compression::Zstd),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("in");
    write_oci_layout(&layers, &default_config(&layers), &input, Some(OCI_REF));
    let want = rootfs_listing(&input);
    for keep in 0..=2 {
        let out = tmp.path().join(format!("k{keep}"));
        export(&input, &out, keep, &["--format", "oci"]);
        assert_listing(&rootfs_listing(&out), &want);
    }
}
