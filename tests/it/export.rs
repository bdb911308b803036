//! `flatfs export` end to end: every input form, every output format, the config and
//! history it writes, determinism, compression, stdout/stdin, platform selection, and
//! the error contract (exit 1, `flatfs: ` message, nothing left behind).
//! See: issue 2, "What a user does" and "The export".

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::util::*;

/// Three layers touching most rules: whiteouts, a hardlink whose target goes away, an
/// implicit parent, xattrs, a big uid, a sub-second mtime.
fn sample_layers() -> Vec<Layer> {
    vec![
        layer([
            dir("etc"),
            file("etc/passwd", "root:x:0:0"),
            file("etc/group", "root:x:0:"),
            dir("bin"),
            file("bin/sh", "#!sh").mode(0o755),
            symlink("bin/bash", "sh"),
            file("a", "data"),
            hardlink("b", "a"),
            dir("tmp").mode(0o1777),
            file("cap", "x").xattr("security.capability", b"\x01\x00\x00\x02"),
            file("owned", "o").uid(3_000_000).gid(3_000_000),
        ]),
        layer([
            whiteout("etc/group"),
            file("etc/hostname", "box"),
            file("var/log/app.log", "log"),
        ]),
        layer([
            whiteout("a"),
            file("message.txt", "Hello, World!").mtime_ns(1_700_000_000, 5),
        ]),
    ]
}

const SAMPLE: &str = r##"
    .                d 0755 0       0       -  -                   -                            0    -
    b                f 0644 0       0       4  "data"              -                            1000 -
    bin              d 0755 0       0       -  -                   -                            1000 -
    bin/bash         l 0777 0       0       2  ->sh                -                            1000 -
    bin/sh           f 0755 0       0       4  "#!sh"              -                            1000 -
    cap              f 0644 0       0       1  "x"                 security.capability=0x01000002 1000 -
    etc              d 0755 0       0       -  -                   -                            1000 -
    etc/hostname     f 0644 0       0       3  "box"               -                            1000 -
    etc/passwd       f 0644 0       0       10 "root:x:0:0"        -                            1000 -
    message.txt      f 0644 0       0       13 "Hello,\x20World!"  -                            1700000000.000000005 -
    owned            f 0644 3000000 3000000 1  "o"                 -                            1000 -
    tmp              d 1777 0       0       -  -                   -                            1000 -
    var              d 0755 0       0       -  -                   -                            0    -
    var/log          d 0755 0       0       -  -                   -                            0    -
    var/log/app.log  f 0644 0       0       3  "log"               -                            1000 -
"##;

/// A scratch directory holding the sample image in one input form.
struct Fixture {
    tmp: TempDir,
    layers: Vec<Layer>,
    config: Value,
}

impl Fixture {
    fn new() -> Self {
        let layers = sample_layers();
        let config = default_config(&layers);
        Fixture {
            tmp: tempfile::tempdir().expect("tempdir"),
            layers,
            config,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn docker(&self) -> PathBuf {
        let p = self.path("image.docker.tar");
        write_docker_archive(&self.layers, &self.config, &p);
        p
    }

    fn docker25(&self) -> PathBuf {
        let p = self.path("image.docker25.tar");
        write_docker25_archive(&self.layers, &self.config, &p);
        p
    }

    fn oci_dir(&self) -> (PathBuf, Written) {
        let p = self.path("image-oci");
        let w = write_oci_layout(&self.layers, &self.config, &p, Some(OCI_REF));
        (p, w)
    }

    fn oci_archive(&self) -> PathBuf {
        let p = self.path("image.oci.tar");
        write_oci_archive(&self.layers, &self.config, &p);
        p
    }
}

/// Runs `flatfs export IMAGE -o OUT ARGS...` with OUT in a fresh directory; asserts
/// success and returns the directory (kept alive) and OUT.
fn export_ok(image: impl AsRef<OsStr>, args: &[&str]) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let mut all: Vec<&OsStr> = vec![
        OsStr::new("export"),
        image.as_ref(),
        OsStr::new("-o"),
        out.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    let res = run_flatfs(&all);
    assert_success(&res);
    assert!(out.exists(), "flatfs succeeded but wrote no {out:?}");
    (tmp, out)
}

/// Runs an export expected to fail; asserts the error contract and that the output
/// directory stays empty; returns stderr.
fn export_fails(image: impl AsRef<OsStr>, args: &[&str]) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let mut all: Vec<&OsStr> = vec![
        OsStr::new("export"),
        image.as_ref(),
        OsStr::new("-o"),
        out.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    let stderr = assert_error(&run_flatfs(&all));
    assert_empty_dir(tmp.path());
    stderr
}

/// Every file under `dir`, by path relative to it.
fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                let rel = rel.to_str().expect("utf-8 path").to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The files of an output, whether it is a tar or (for `--format oci`) a directory.
fn output_files(out: &Path) -> BTreeMap<String, Vec<u8>> {
    if out.is_dir() {
        dir_files(out)
    } else {
        tar_files(&std::fs::read(out).expect("read output"))
    }
}

/// A flattened image read back from an output, after checking its internal consistency.
struct Flat {
    config: Value,
    layer_blob: Vec<u8>,
    /// OCI outputs only.
    layer_media_type: Option<String>,
    /// docker-archive outputs only.
    repo_tags: Option<Value>,
}

fn json_of(bytes: &[u8], what: &str) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
}

/// Reads a docker-archive output: one manifest.json entry, a config named by its digest,
/// one layer whose sha256 (uncompressed) is the config's only diff_id.
fn read_docker(files: &BTreeMap<String, Vec<u8>>) -> Flat {
    let manifest = json_of(
        files
            .get("manifest.json")
            .expect("docker-archive has manifest.json"),
        "manifest.json",
    );
    let entries = manifest.as_array().expect("manifest.json is an array");
    assert_eq!(entries.len(), 1, "one image in manifest.json: {manifest}");
    let m = &entries[0];
    let config_name = m["Config"].as_str().expect("Config");
    let config_bytes = files.get(config_name).expect("Config file exists");
    assert!(
        config_name.contains(&sha256_hex(config_bytes)),
        "Config {config_name} is not named by its sha256"
    );
    let config = json_of(config_bytes, "config");
    let layers = m["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), 1, "exactly one layer: {m}");
    let layer_blob = files
        .get(layers[0].as_str().expect("layer path"))
        .expect("layer file exists")
        .clone();
    check_diff_id(&config, &layer_blob);
    Flat {
        config,
        layer_blob,
        layer_media_type: None,
        repo_tags: Some(m["RepoTags"].clone()),
    }
}

fn blob_of<'a>(files: &'a BTreeMap<String, Vec<u8>>, desc: &Value) -> &'a [u8] {
    let digest = desc["digest"].as_str().expect("descriptor digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("blob {digest} missing"));
    assert_eq!(
        digest_of(bytes),
        digest,
        "blob content does not match its digest"
    );
    assert_eq!(
        desc["size"].as_u64(),
        Some(bytes.len() as u64),
        "descriptor size of {digest}"
    );
    bytes
}

/// Reads an OCI output: oci-layout, index.json -> manifest -> config and one layer, each
/// blob matching its digest and size.
fn read_oci(files: &BTreeMap<String, Vec<u8>>) -> Flat {
    let layout = json_of(files.get("oci-layout").expect("oci-layout"), "oci-layout");
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index = json_of(files.get("index.json").expect("index.json"), "index.json");
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image in index.json: {index}");
    assert_eq!(manifests[0]["mediaType"], MT_OCI_MANIFEST);
    let manifest = json_of(blob_of(files, &manifests[0]), "manifest");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], MT_OCI_MANIFEST);
    assert_eq!(manifest["config"]["mediaType"], MT_OCI_CONFIG);
    let config = json_of(blob_of(files, &manifest["config"]), "config");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "exactly one layer: {manifest}");
    let layer_blob = blob_of(files, &layers[0]).to_vec();
    check_diff_id(&config, &layer_blob);
    Flat {
        config,
        layer_blob,
        layer_media_type: Some(layers[0]["mediaType"].as_str().expect("mediaType").into()),
        repo_tags: None,
    }
}

#[track_caller]
fn check_diff_id(config: &Value, layer_blob: &[u8]) {
    assert_eq!(config["rootfs"]["type"], "layers");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), 1, "exactly one diff_id: {diff_ids:?}");
    assert_eq!(
        diff_ids[0],
        digest_of(&decompress(layer_blob)),
        "diff_id is not the sha256 of the uncompressed layer"
    );
}

/// Everything of the source config but `rootfs` and `history` is kept as is; history
/// keeps every old entry marked `empty_layer` and gains one entry by flatfs.
#[track_caller]
fn check_config(original: &Value, flat: &Value) {
    for (key, value) in original.as_object().expect("config object") {
        if key != "rootfs" && key != "history" {
            assert_eq!(&flat[key], value, "config field {key} changed");
        }
    }
    let old = original["history"].as_array().expect("old history");
    let new = flat["history"].as_array().expect("new history");
    assert_eq!(new.len(), old.len() + 1, "history: {new:#?}");
    for (o, n) in old.iter().zip(new) {
        let mut want = o.clone();
        want["empty_layer"] = json!(true);
        assert_eq!(*n, want, "old history entries are kept, marked empty_layer");
    }
    let last = new.last().expect("new entry");
    assert_ne!(last["empty_layer"], true, "the flatfs entry adds the layer");
    assert!(
        last["created_by"]
            .as_str()
            .is_some_and(|s| s.contains("flatfs")),
        "last history entry should say flatfs made it: {last}"
    );
}

/// The listing without the root line, for comparing a layer with a rootfs (a layer may
/// or may not carry an entry for `./`).
fn without_root(listing: &str) -> String {
    listing
        .lines()
        .filter(|l| !l.starts_with(". "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[track_caller]
fn check_layer_tree(flat: &Flat) {
    let tree = tar_listing(&decompress(&flat.layer_blob));
    assert_listing(&without_root(&tree), &without_root(&expected(SAMPLE)));
}

// --- Input forms ---------------------------------------------------------------------------

#[test]
fn input_classic_docker_archive() {
    let f = Fixture::new();
    assert_listing(&rootfs_listing(f.docker()), SAMPLE);
}

#[test]
fn input_docker_archive_whose_config_name_is_not_its_digest() {
    // go-containerregistry's `mutate` edits a config in place and keeps its old name;
    // `docker load`, skopeo and podman read the file manifest.json names.
    let f = Fixture::new();
    let mut files = tar_files(&std::fs::read(f.docker()).expect("read archive"));
    let name = files
        .keys()
        .find(|k| k.ends_with(".json") && k.len() == 69)
        .expect("config member")
        .clone();
    let mut config = json_of(&files[&name], "config");
    config["config"]["Env"] = json!(["EDITED=in place"]);
    let edited = serde_json::to_vec(&config).expect("json");
    let content_digest = digest_of(&edited);
    files.insert(name.clone(), edited);
    let entries: Vec<Entry> = files.iter().map(|(p, d)| file(p, d)).collect();
    let image = f.path("edited.tar");
    std::fs::write(&image, tar_of(&entries, false)).expect("write archive");

    let out = f.path("flat.tar");
    let res = run_flatfs([
        OsStr::new("export"),
        image.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--format"),
        OsStr::new("docker-archive"),
    ]);
    assert_success(&res);
    let stderr = stderr_of(&res);
    let named = format!("sha256:{}", name.trim_end_matches(".json"));
    assert!(
        stderr.contains(&named) && stderr.contains(&content_digest),
        "the warning names both digests:\n{stderr}"
    );
    let flat = read_docker(&output_files(&out));
    assert_eq!(flat.config["config"]["Env"], json!(["EDITED=in place"]));
    let history = flat.config["history"].as_array().expect("history");
    let last = history.last().expect("flatfs entry")["created_by"].to_string();
    assert!(
        last.contains(&content_digest),
        "image ID is the content's: {last}"
    );
    check_layer_tree(&flat);
}

#[test]
fn input_docker25_archive() {
    let f = Fixture::new();
    assert_listing(&rootfs_listing(f.docker25()), SAMPLE);
}

#[test]
fn input_oci_layout_dir() {
    let f = Fixture::new();
    assert_listing(&rootfs_listing(f.oci_dir().0), SAMPLE);
}

#[test]
fn input_oci_layout_dir_without_ref_name() {
    let f = Fixture::new();
    let p = f.path("untagged");
    write_oci_layout(&f.layers, &f.config, &p, None);
    assert_listing(&rootfs_listing(p), SAMPLE);
}

#[test]
fn input_oci_layout_dir_with_ref() {
    let f = Fixture::new();
    let other = vec![layer([file("other", "1")])];
    let mut oci = OciLayout::new();
    let (d1, _) = oci.add_image(&other, &default_config(&other));
    oci.add_index_entry(with_annotations(
        d1,
        &[("org.opencontainers.image.ref.name", "v1")],
    ));
    let (d2, _) = oci.add_image(&f.layers, &f.config);
    oci.add_index_entry(with_annotations(
        d2,
        &[("org.opencontainers.image.ref.name", "v2")],
    ));
    let dir = f.path("two-refs");
    oci.write_dir(&dir);
    let arg = |r: &str| format!("{}:{r}", dir.display());
    assert_listing(&rootfs_listing(arg("v2")), SAMPLE);
    assert_listing(
        &rootfs_listing(arg("v1")),
        r#"
        .      d 0755 0 0 - -   - 0    -
        other  f 0644 0 0 1 "1" - 1000 -
        "#,
    );
}

#[test]
fn input_oci_layout_dir_with_unknown_ref_is_an_error() {
    let f = Fixture::new();
    let (dir, _) = f.oci_dir();
    let stderr = export_fails(
        format!("{}:no-such-ref", dir.display()),
        &["--format", "rootfs"],
    );
    assert!(
        stderr.contains("no-such-ref"),
        "error should name the ref:\n{stderr}"
    );
}

#[test]
fn input_oci_archive() {
    let f = Fixture::new();
    assert_listing(&rootfs_listing(f.oci_archive()), SAMPLE);
}

#[test]
fn input_docker_media_types_in_oci_layout() {
    let f = Fixture::new();
    let mut oci = OciLayout::new();
    let (desc, _) = oci.add_docker_image(&f.layers, &f.config);
    oci.add_index_entry(with_annotations(
        desc,
        &[("org.opencontainers.image.ref.name", "latest")],
    ));
    let dir = f.path("docker-types");
    oci.write_dir(&dir);
    assert_listing(&rootfs_listing(dir), SAMPLE);
}

fn stdin_rootfs(image: Vec<u8>) -> String {
    let res = run_flatfs_stdin(["export", "-", "-o", "-", "--format", "rootfs"], image);
    assert_success(&res);
    tar_listing(&res.stdout)
}

#[test]
fn input_stdin_docker_archive() {
    let f = Fixture::new();
    assert_listing(
        &stdin_rootfs(docker_archive_bytes(&f.layers, &f.config)),
        SAMPLE,
    );
}

#[test]
fn input_stdin_oci_archive() {
    let f = Fixture::new();
    let bytes = std::fs::read(f.oci_archive()).expect("read");
    assert_listing(&stdin_rootfs(bytes), SAMPLE);
}

#[test]
fn input_that_does_not_exist_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("missing.tar");
    let stderr = export_fails(&missing, &["--format", "rootfs"]);
    assert!(
        stderr.contains("missing.tar"),
        "error should name the input:\n{stderr}"
    );
}

// --- Output formats --------------------------------------------------------------------------

#[test]
fn output_docker_archive_is_a_valid_single_layer_image() {
    let f = Fixture::new();
    let (_tmp, out) = export_ok(f.docker(), &["--format", "docker-archive"]);
    let flat = read_docker(&output_files(&out));
    check_config(&f.config, &flat.config);
    check_layer_tree(&flat);
    assert_eq!(
        flat.repo_tags,
        Some(json!([DOCKER_TAG])),
        "default tag is the input's"
    );
    // As `docker save` writes it: the layer file is the uncompressed tar.
    assert_eq!(
        digest_of(&flat.layer_blob),
        flat.config["rootfs"]["diff_ids"][0],
        "docker-archive layer should be uncompressed by default"
    );
}

#[test]
fn output_docker_archive_tag_flag_sets_repo_tags() {
    let f = Fixture::new();
    let (_tmp, out) = export_ok(
        f.oci_dir().0,
        &["--format", "docker-archive", "--tag", "example.org/flat:2"],
    );
    let flat = read_docker(&output_files(&out));
    assert_eq!(flat.repo_tags, Some(json!(["example.org/flat:2"])));
}

#[test]
fn output_oci_archive_is_a_valid_single_layer_image() {
    let f = Fixture::new();
    let (_tmp, out) = export_ok(f.docker(), &["--format", "oci-archive"]);
    let flat = read_oci(&output_files(&out));
    check_config(&f.config, &flat.config);
    check_layer_tree(&flat);
    assert_eq!(flat.layer_media_type.as_deref(), Some(MT_LAYER_GZIP));
}

#[test]
fn output_oci_layout_dir_is_a_valid_single_layer_image() {
    let f = Fixture::new();
    let (_tmp, out) = export_ok(f.oci_archive(), &["--format", "oci"]);
    assert!(out.is_dir(), "--format oci writes a directory");
    let flat = read_oci(&output_files(&out));
    check_config(&f.config, &flat.config);
    check_layer_tree(&flat);
    assert_eq!(flat.layer_media_type.as_deref(), Some(MT_LAYER_GZIP));
}

#[test]
fn output_from_docker25_input_keeps_config_and_history() {
    let f = Fixture::new();
    let (_tmp, out) = export_ok(f.docker25(), &["--format", "oci-archive"]);
    let flat = read_oci(&output_files(&out));
    check_config(&f.config, &flat.config);
    check_layer_tree(&flat);
}

#[test]
fn default_format_follows_input_family() {
    let f = Fixture::new();
    for docker_input in [f.docker(), f.docker25()] {
        let (_tmp, out) = export_ok(&docker_input, &[]);
        let files = output_files(&out);
        assert!(
            files.contains_key("manifest.json"),
            "docker input should give a docker-archive by default; files: {:?}",
            files.keys().collect::<Vec<_>>()
        );
        read_docker(&files);
    }
    for oci_input in [f.oci_dir().0, f.oci_archive()] {
        let (_tmp, out) = export_ok(&oci_input, &[]);
        assert!(
            out.is_file(),
            "OCI input gives an oci-archive (a file) by default"
        );
        let files = output_files(&out);
        assert!(
            !files.contains_key("manifest.json"),
            "OCI input should give an oci-archive by default; files: {:?}",
            files.keys().collect::<Vec<_>>()
        );
        read_oci(&files);
    }
}

#[test]
fn compression_flag_sets_layer_encoding_and_media_type() {
    let f = Fixture::new();
    let (image, _) = f.oci_dir();
    for (flag, media_type, magic) in [
        ("gzip", MT_LAYER_GZIP, &[0x1f, 0x8b][..]),
        ("zstd", MT_LAYER_ZSTD, &[0x28, 0xb5, 0x2f, 0xfd][..]),
        ("none", MT_LAYER_TAR, &b""[..]),
    ] {
        for format in ["oci-archive", "oci"] {
            let (_tmp, out) = export_ok(&image, &["--format", format, "--compression", flag]);
            let flat = read_oci(&output_files(&out));
            assert_eq!(
                flat.layer_media_type.as_deref(),
                Some(media_type),
                "--compression {flag} --format {format}"
            );
            assert!(
                flat.layer_blob.starts_with(magic),
                "--compression {flag}: layer does not start with the right magic"
            );
            if flag == "none" {
                assert_eq!(
                    digest_of(&flat.layer_blob),
                    flat.config["rootfs"]["diff_ids"][0]
                );
            }
            check_layer_tree(&flat);
        }
    }
}

#[test]
fn flattened_image_flattens_to_the_same_tree() {
    let f = Fixture::new();
    for format in ["oci-archive", "docker-archive", "oci"] {
        let (_tmp, out) = export_ok(f.docker(), &["--format", format]);
        assert_listing(&rootfs_listing(&out), SAMPLE);
    }
}

#[test]
fn source_date_epoch_clamps_mtimes_and_sets_created() {
    let f = Fixture::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out.tar");
    let res = flatfs()
        .env("SOURCE_DATE_EPOCH", "500")
        .args([
            OsStr::new("export"),
            f.docker().as_os_str(),
            OsStr::new("-o"),
            out.as_os_str(),
        ])
        .args(["--format", "oci-archive"])
        .output()
        .expect("run flatfs");
    assert_success(&res);
    let flat = read_oci(&output_files(&out));
    let created = flat.config["created"].as_str().expect("created");
    assert!(
        created.starts_with("1970-01-01T00:08:20"),
        "created should be SOURCE_DATE_EPOCH, got {created}"
    );
    let tree = tar_listing(&decompress(&flat.layer_blob));
    let clamped = expected(SAMPLE)
        .replace(" 1700000000.000000005 ", " 500 ")
        .replace(" 1000 ", " 500 ");
    assert_listing(&without_root(&tree), &without_root(&clamped));
}

// --- Determinism and streaming ---------------------------------------------------------------

#[test]
fn output_is_byte_for_byte_deterministic() {
    let f = Fixture::new();
    let image = f.docker();
    for format in ["docker-archive", "oci-archive", "oci", "rootfs"] {
        let (_t1, a) = export_ok(&image, &["--format", format]);
        let (_t2, b) = export_ok(&image, &["--format", format]);
        if a.is_dir() {
            assert!(
                dir_files(&a) == dir_files(&b),
                "--format {format} differs between runs"
            );
        } else {
            let (a, b) = (
                std::fs::read(&a).expect("read"),
                std::fs::read(&b).expect("read"),
            );
            assert!(a == b, "--format {format} differs between runs");
        }
    }
}

#[test]
fn same_tree_from_any_input_form_gives_the_same_layer() {
    let f = Fixture::new();
    let inputs = [f.docker(), f.docker25(), f.oci_dir().0, f.oci_archive()];
    let diff_ids: Vec<Value> = inputs
        .iter()
        .map(|i| {
            let (_tmp, out) = export_ok(i, &["--format", "oci-archive"]);
            read_oci(&output_files(&out)).config["rootfs"]["diff_ids"][0].clone()
        })
        .collect();
    assert!(
        diff_ids.windows(2).all(|w| w[0] == w[1]),
        "the flattened layer depends on the input form: {diff_ids:?}"
    );
}

#[test]
fn stdout_output_equals_file_output() {
    let f = Fixture::new();
    let image = f.docker();
    for format in ["docker-archive", "oci-archive", "rootfs"] {
        let (_tmp, out) = export_ok(&image, &["--format", format]);
        let res = run_flatfs([
            "export".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            "-".as_ref(),
            "--format".as_ref(),
            OsStr::new(format),
        ]);
        assert_success(&res);
        assert!(
            res.stdout == std::fs::read(&out).expect("read"),
            "-o - differs from -o FILE for --format {format}"
        );
    }
}

#[test]
fn stdin_to_stdout_equals_file_to_file() {
    let f = Fixture::new();
    let image = f.docker();
    let (_tmp, out) = export_ok(&image, &[]);
    let res = run_flatfs_stdin(
        ["export", "-", "-o", "-"],
        std::fs::read(&image).expect("read"),
    );
    assert_success(&res);
    assert!(
        res.stdout == std::fs::read(&out).expect("read"),
        "stdin-to-stdout output differs from file-to-file output"
    );
}

// --- The rootfs tar format -------------------------------------------------------------------

fn rootfs_raw(layers: Vec<Layer>) -> (Vec<u8>, Vec<RawEntry>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("image");
    write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    let bytes = export_rootfs(&dir, &[]);
    let raw = raw_entries(&bytes);
    (bytes, raw)
}

fn names(raw: &[RawEntry]) -> Vec<String> {
    raw.iter().map(|e| esc(&e.name)).collect()
}

#[test]
fn rootfs_is_a_plain_tar_whose_first_entry_is_dot_slash() {
    let (bytes, raw) = rootfs_raw(vec![layer([file("a", "1")])]);
    assert!(
        !bytes.starts_with(&[0x1f, 0x8b]),
        "rootfs must not be compressed"
    );
    assert_eq!(bytes.len() % 512, 0);
    assert_eq!(esc(&raw[0].name), "./", "first entry: {:?}", names(&raw));
    assert_eq!(raw[0].typeflag, b'5');
}

#[test]
fn rootfs_paths_have_no_dot_slash_prefix_and_dirs_end_in_slash() {
    let (_, raw) = rootfs_raw(vec![layer([
        dir("./d"),
        file("./d/f", "1"),
        file("/g/h", "2"),
        symlink("./l", "d"),
    ])]);
    assert_eq!(names(&raw), ["./", "d/", "d/f", "g/", "g/h", "l"]);
}

#[test]
fn rootfs_entries_are_sorted_depth_first_by_name_bytes() {
    let (_, raw) = rootfs_raw(vec![
        layer([
            file(b"\xff", "1"),
            file("b", "2"),
            file("a/b/c", "3"),
            file("ab", "4"),
        ]),
        layer([
            file("a0", "5"),
            file("a.d", "6"),
            file("A", "7"),
            file("a-c", "8"),
        ]),
    ]);
    // Not plain byte order of whole paths, where "a-c" and "a.d" would precede "a/".
    assert_eq!(
        names(&raw),
        [
            "./", "A", "a/", "a/b/", "a/b/c", "a-c", "a.d", "a0", "ab", "b", "\\xff"
        ]
    );
}

#[test]
fn rootfs_first_name_of_a_hardlink_group_is_the_file() {
    let (_, raw) = rootfs_raw(vec![layer([
        file("z", "data"),
        hardlink("a", "z"),
        hardlink("m", "z"),
    ])]);
    let got: Vec<(String, char, String)> = raw[1..]
        .iter()
        .map(|e| (esc(&e.name), char::from(e.typeflag), esc(&e.link)))
        .collect();
    let want = [
        ("a".to_string(), '0', String::new()),
        ("m".to_string(), '1', "a".to_string()),
        ("z".to_string(), '1', "a".to_string()),
    ];
    assert_eq!(got, want);
}

#[test]
fn rootfs_uses_pax_for_long_names_big_ids_subsecond_mtime_and_xattrs() {
    let long_dir = "d".repeat(120);
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let target = format!("/{}", "t".repeat(150));
    let (_, raw) = rootfs_raw(vec![layer([
        file(&long_file, "1").long_names(LongNames::Gnu),
        symlink("s", &target).long_names(LongNames::Gnu),
        file("u", "2")
            .uid(3_000_000)
            .gid(4_000_000)
            .big_ids(BigIds::Base256),
        file("m", "3").mtime_ns(1_700_000_000, 1),
        file("x", "4").xattr("user.a", b"\x00\n"),
    ])]);
    let by_name = |n: &str| {
        raw.iter()
            .find(|e| e.name == n.as_bytes())
            .unwrap_or_else(|| panic!("no entry {n}: {:?}", names(&raw)))
    };
    assert_eq!(
        by_name(&format!("{long_dir}/")).pax_value("path"),
        Some(format!("{long_dir}/").as_bytes())
    );
    assert_eq!(
        by_name(&long_file).pax_value("path"),
        Some(long_file.as_bytes())
    );
    assert_eq!(by_name("s").pax_value("linkpath"), Some(target.as_bytes()));
    assert_eq!(by_name("u").pax_value("uid"), Some(&b"3000000"[..]));
    assert_eq!(by_name("u").pax_value("gid"), Some(&b"4000000"[..]));
    let mtime = by_name("m").pax_value("mtime").expect("pax mtime");
    assert_eq!(
        pax_mtime(mtime),
        "1700000000.000000001",
        "sub-second mtime in PAX"
    );
    assert_eq!(
        by_name("x").pax_value("SCHILY.xattr.user.a"),
        Some(&b"\x00\n"[..])
    );
}

// --- Platform selection ----------------------------------------------------------------------

/// An image whose only file `arch` holds its platform, so the listing shows which one
/// flatfs picked.
fn platform_image(oci: &mut OciLayout, arch: &str, variant: Option<&str>) -> Value {
    let label = match variant {
        Some(v) => format!("{arch}/{v}"),
        None => arch.to_string(),
    };
    let layers = vec![layer([file("arch", &label)])];
    let mut config = default_config(&layers);
    config["architecture"] = json!(arch);
    if let Some(v) = variant {
        config["variant"] = json!(v);
    }
    let (desc, _) = oci.add_image(&layers, &config);
    with_platform(desc, "linux", arch, variant)
}

/// A buildx attestation manifest: platform unknown/unknown, in-toto layers.
fn attestation(oci: &mut OciLayout, subject: &Value) -> Value {
    let config = oci.add_blob(MT_OCI_CONFIG, b"{}".to_vec());
    let statement = oci.add_blob(
        "application/vnd.in-toto+json",
        br#"{"_type":"https://in-toto.io/Statement/v0.1"}"#.to_vec(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": config,
        "layers": [statement],
    });
    let desc = oci.add_blob(
        MT_OCI_MANIFEST,
        serde_json::to_vec(&manifest).expect("json"),
    );
    let desc = with_platform(desc, "unknown", "unknown", None);
    with_annotations(
        desc,
        &[
            ("vnd.docker.reference.type", "attestation-manifest"),
            (
                "vnd.docker.reference.digest",
                subject["digest"].as_str().expect("digest"),
            ),
        ],
    )
}

fn picked(listing: &str) -> String {
    listing
        .lines()
        .find_map(|l| l.strip_prefix("arch f 0644 0 0 "))
        .and_then(|rest| rest.split(' ').nth(1))
        .unwrap_or_else(|| panic!("no arch file in:\n{listing}"))
        .trim_matches('"')
        .to_string()
}

/// amd64, arm64 and the host's own architecture, each with an attestation manifest
/// listed first, all in one index.
fn multi_platform_layout(dir: &Path, nested: bool) {
    let mut oci = OciLayout::new();
    let mut arches = vec!["amd64", "arm64", host_arch()];
    arches.sort();
    arches.dedup();
    let mut descs = Vec::new();
    for arch in arches {
        let image = platform_image(&mut oci, arch, None);
        descs.push(attestation(&mut oci, &image));
        descs.push(image);
    }
    if nested {
        let index = oci.add_index(descs);
        oci.add_index_entry(with_annotations(
            index,
            &[("org.opencontainers.image.ref.name", "latest")],
        ));
    } else {
        for d in descs {
            oci.add_index_entry(d);
        }
    }
    oci.write_dir(dir);
}

#[test]
fn multi_platform_index_default_is_the_host_platform() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("multi");
    multi_platform_layout(&dir, false);
    assert_eq!(picked(&rootfs_listing(&dir)), host_arch());
}

#[test]
fn multi_platform_index_platform_flag_picks_arm64() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("multi");
    multi_platform_layout(&dir, false);
    let listing = tar_listing(&export_rootfs(&dir, &["--platform", "linux/arm64"]));
    assert_eq!(picked(&listing), "arm64");
    let listing = tar_listing(&export_rootfs(&dir, &["--platform", "linux/amd64"]));
    assert_eq!(picked(&listing), "amd64");
}

#[test]
fn multi_platform_index_platform_is_kept_in_the_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("multi");
    multi_platform_layout(&dir, false);
    let (_t, out) = export_ok(
        &dir,
        &["--platform", "linux/arm64", "--format", "oci-archive"],
    );
    let flat = read_oci(&output_files(&out));
    assert_eq!(flat.config["architecture"], "arm64");
    assert_eq!(flat.config["os"], "linux");
}

#[test]
fn nested_index_is_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("nested");
    multi_platform_layout(&dir, true);
    assert_eq!(picked(&rootfs_listing(&dir)), host_arch());
    let listing = tar_listing(&export_rootfs(&dir, &["--platform", "linux/arm64"]));
    assert_eq!(picked(&listing), "arm64");
}

#[test]
fn platform_variant_is_matched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("arm");
    let mut oci = OciLayout::new();
    for v in ["v6", "v7"] {
        let d = platform_image(&mut oci, "arm", Some(v));
        oci.add_index_entry(d);
    }
    oci.write_dir(&dir);
    for v in ["v7", "v6"] {
        let platform = format!("linux/arm/{v}");
        let listing = tar_listing(&export_rootfs(&dir, &["--platform", &platform]));
        assert_eq!(picked(&listing), format!("arm/{v}"));
    }
}

#[test]
fn attestation_manifest_is_never_picked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("attest");
    let mut oci = OciLayout::new();
    let image = platform_image(&mut oci, host_arch(), None);
    let att = attestation(&mut oci, &image);
    // The attestation comes first, so "take the first manifest" would pick it.
    oci.add_index_entry(att);
    oci.add_index_entry(image);
    oci.write_dir(&dir);
    assert_eq!(picked(&rootfs_listing(&dir)), host_arch());
    // Asked for by name it is still not an image: issue 2 says such manifests are
    // never picked, and their layers are in-toto JSON, not tars.
    export_fails(
        &dir,
        &["--format", "rootfs", "--platform", "unknown/unknown"],
    );
}

#[test]
fn index_platform_wins_over_a_config_that_disagrees() {
    // The index says darwin/amd64 for an image whose config says linux/amd64: containerd
    // and skopeo select by the index entry, and so does flatfs, with a warning.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mislabelled");
    let mut oci = OciLayout::new();
    let darwin = {
        let layers = vec![layer([file("arch", "darwin-in-index")])];
        let mut config = default_config(&layers);
        config["os"] = json!("linux");
        config["architecture"] = json!("amd64");
        let (desc, _) = oci.add_image(&layers, &config);
        with_platform(desc, "darwin", "amd64", None)
    };
    let darwin_digest = darwin["digest"].as_str().expect("digest").to_string();
    oci.add_index_entry(darwin);
    let linux = platform_image(&mut oci, "amd64", None);
    oci.add_index_entry(linux);
    oci.write_dir(&dir);

    let out = tmp.path().join("rootfs.tar");
    let res = run_flatfs([
        OsStr::new("export"),
        dir.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
        OsStr::new("--format"),
        OsStr::new("rootfs"),
        OsStr::new("--platform"),
        OsStr::new("darwin/amd64"),
    ]);
    assert_success(&res);
    let listing = tar_listing(&std::fs::read(&out).expect("read rootfs"));
    assert_eq!(picked(&listing), "darwin-in-index");
    let stderr = stderr_of(&res);
    assert!(
        stderr.contains(&darwin_digest)
            && stderr.contains("darwin/amd64")
            && stderr.contains("linux/amd64"),
        "the warning names the manifest and both platforms:\n{stderr}"
    );
    // The entry whose index and config agree is still the one linux/amd64 selects.
    let listing = tar_listing(&export_rootfs(&dir, &["--platform", "linux/amd64"]));
    assert_eq!(picked(&listing), "amd64");
}

#[test]
fn config_platform_is_checked_when_the_index_entry_has_none() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("single");
    let layers = vec![layer([file("arch", "arm64")])];
    let mut config = default_config(&layers);
    config["architecture"] = json!("arm64");
    write_oci_layout(&layers, &config, &dir, Some(OCI_REF));
    let listing = tar_listing(&export_rootfs(&dir, &["--platform", "linux/arm64"]));
    assert_eq!(picked(&listing), "arm64");
    let stderr = export_fails(&dir, &["--format", "rootfs", "--platform", "linux/s390x"]);
    assert!(stderr.contains("linux/arm64"), "{stderr}");
}

#[test]
fn platform_missing_from_index_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("multi");
    multi_platform_layout(&dir, false);
    let stderr = export_fails(&dir, &["--format", "rootfs", "--platform", "linux/riscv64"]);
    assert!(
        stderr.contains("riscv64"),
        "error should name the platform:\n{stderr}"
    );
}

// --- Errors --------------------------------------------------------------------------------

/// A schema-1 manifest as registries served them before 2017: `fsLayers` and v1 history,
/// no config.
fn schema1_manifest(oci: &mut OciLayout, media_type: Option<&str>) -> Vec<u8> {
    let layer_desc = oci.add_blob(MT_LAYER_GZIP, b"not read".to_vec());
    let mut m = json!({
        "schemaVersion": 1,
        "name": "library/old",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": layer_desc["digest"]}],
        "history": [{"v1Compatibility": "{\"id\":\"0\"}"}],
    });
    if let Some(mt) = media_type {
        m["mediaType"] = json!(mt);
    }
    serde_json::to_vec(&m).expect("json")
}

#[track_caller]
fn assert_schema1_error(stderr: &str, names: &str) {
    assert!(
        stderr.contains("schema-1") && stderr.contains("skopeo copy") && stderr.contains(names),
        "the error says it is a schema-1 image, how to convert it, and names {names}:\n{stderr}"
    );
    assert!(!stderr.contains("no manifest for platform"), "{stderr}");
}

#[test]
fn schema1_manifest_is_refused_by_name_with_how_to_convert_it() {
    const V1_JSON: &str = "application/vnd.docker.distribution.manifest.v1+json";
    const V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    let tmp = tempfile::tempdir().expect("tempdir");
    // The index entry says schema 1 (with and without a platform), or only the manifest
    // itself does, under a schema-2 media type, with or without its own mediaType field.
    let cases = [
        (V1_SIGNED, Some(V1_SIGNED), false),
        (V1_JSON, None, true),
        (MT_OCI_MANIFEST, None, false),
        (MT_DOCKER_MANIFEST, Some(V1_JSON), false),
    ];
    for (i, (entry_type, doc_type, platform)) in cases.into_iter().enumerate() {
        let mut oci = OciLayout::new();
        let bytes = schema1_manifest(&mut oci, doc_type);
        let mut desc = oci.add_blob(entry_type, bytes);
        if platform {
            desc = with_platform(desc, "linux", host_arch(), None);
        }
        let digest = desc["digest"].as_str().expect("digest").to_string();
        oci.add_index_entry(desc);
        let dir = tmp.path().join(format!("case{i}"));
        oci.write_dir(&dir);
        let stderr = export_fails(&dir, &["--format", "rootfs"]);
        assert_schema1_error(&stderr, &digest);
    }

    // Nested: an index whose only entry for the host is schema 1.
    let mut oci = OciLayout::new();
    let bytes = schema1_manifest(&mut oci, Some(V1_SIGNED));
    let desc = with_platform(oci.add_blob(V1_SIGNED, bytes), "linux", host_arch(), None);
    let digest = desc["digest"].as_str().expect("digest").to_string();
    let index = oci.add_index(vec![desc]);
    oci.add_index_entry(index);
    let dir = tmp.path().join("nested");
    oci.write_dir(&dir);
    assert_schema1_error(&export_fails(&dir, &["--format", "rootfs"]), &digest);

    // A schema-1 entry does not hide a schema-2 image for the same platform.
    let mut oci = OciLayout::new();
    let bytes = schema1_manifest(&mut oci, None);
    let desc = oci.add_blob(V1_JSON, bytes);
    oci.add_index_entry(desc);
    let image = platform_image(&mut oci, host_arch(), None);
    oci.add_index_entry(image);
    let dir = tmp.path().join("both");
    oci.write_dir(&dir);
    assert_eq!(picked(&rootfs_listing(&dir)), host_arch());

    // index.json that is itself a schema-1 manifest.
    let mut oci = OciLayout::new();
    let bytes = schema1_manifest(&mut oci, None);
    let dir = tmp.path().join("as-index");
    oci.write_dir(&dir);
    std::fs::write(dir.join("index.json"), bytes).expect("write index.json");
    assert_schema1_error(&export_fails(&dir, &["--format", "rootfs"]), "index.json");
}

#[test]
fn schema1_skopeo_dir_is_refused_and_skopeo_converts_it_as_the_error_says() {
    // `skopeo copy docker://… dir:DIR` of a schema-1 image: manifest.json is the manifest.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dir");
    std::fs::create_dir(&dir).expect("mkdir");
    let blob = layer([file("hello.txt", "hello\n")]).blob(Compression::Gzip);
    let hex = blob.digest.trim_start_matches("sha256:");
    std::fs::write(dir.join(hex), &blob.bytes).expect("write layer");
    let v1 = json!({"id": "a".repeat(64), "os": "linux", "architecture": "amd64",
                    "created": "2017-01-01T00:00:00Z", "config": {"Cmd": ["/bin/sh"]}});
    let manifest = json!({
        "schemaVersion": 1,
        "name": "library/old",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": blob.digest}],
        "history": [{"v1Compatibility": v1.to_string()}],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("write manifest");
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").expect("write");
    assert_schema1_error(
        &export_fails(&dir, &["--format", "rootfs"]),
        "manifest.json",
    );

    let have_skopeo = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_skopeo,
        "schema1 conversion check needs skopeo (scripts/test.sh installs it)"
    );
    let converted = tmp.path().join("converted");
    let out = std::process::Command::new("skopeo")
        .arg("copy")
        .arg(format!("dir:{}", dir.display()))
        .arg(format!("oci:{}:latest", converted.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = rootfs_listing(&converted);
    assert!(
        listing.contains("hello.txt f 0644 0 0 6 \"hello\\x0a\""),
        "{listing}"
    );
}

#[test]
fn layer_digest_mismatch_is_an_error_naming_the_layer() {
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    let evil = layers[1].clone().stored_as(layer([file("evil", "x")]));
    layers[1] = evil.compression(Compression::None);
    let dir = f.path("tampered");
    let written = write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    for format in ["rootfs", "oci-archive", "oci", "docker-archive"] {
        let stderr = export_fails(&dir, &["--format", format]);
        assert_names_layer(&stderr, &written, 1);
    }
}

#[test]
fn docker25_layer_digest_mismatch_is_an_error_naming_the_layer() {
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    layers[2] = layers[2].clone().stored_as(layer([file("evil", "x")]));
    let p = f.path("tampered.tar");
    let written = write_docker25_archive(&layers, &default_config(&layers), &p);
    let stderr = export_fails(&p, &["--format", "rootfs"]);
    assert_names_layer(&stderr, &written, 2);
}

#[test]
fn docker_archive_diff_id_mismatch_is_an_error_naming_the_layer() {
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    layers[0] = layers[0].clone().stored_as(layer([file("evil", "x")]));
    let p = f.path("tampered.tar");
    let written = write_docker_archive(&layers, &default_config(&layers), &p);
    for format in ["rootfs", "docker-archive"] {
        let stderr = export_fails(&p, &["--format", format]);
        assert_names_layer(&stderr, &written, 0);
    }
}

#[test]
fn truncated_gzip_layer_is_an_error_and_leaves_nothing() {
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    layers[1] = layers[1]
        .clone()
        .compression(Compression::Gzip)
        .truncate_blob(20);
    let dir = f.path("truncated");
    let written = write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    for format in ["rootfs", "oci-archive", "oci", "docker-archive"] {
        let stderr = export_fails(&dir, &["--format", format]);
        assert_names_layer(&stderr, &written, 1);
    }
}

#[test]
fn truncated_gzip_layer_on_stdout_is_still_exit_1() {
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    layers[2] = layers[2]
        .clone()
        .compression(Compression::Gzip)
        .truncate_blob(20);
    let dir = f.path("truncated");
    write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    let res = run_flatfs([
        "export".as_ref(),
        dir.as_os_str(),
        "-o".as_ref(),
        "-".as_ref(),
    ]);
    assert_error(&res);
}

#[test]
fn a_failing_output_is_reported_as_itself_not_as_a_stopped_pipeline() {
    // The writer thread fails first (ENOSPC); the walk then finds its pipe closed. The user must
    // see the cause, with exit 1 (a closed pipe would look like `| head` and exit 141).
    let f = Fixture::new();
    let mut layers = f.layers.clone();
    // More than the pipe and the output buffer hold, so the walk is still writing when the
    // writer fails.
    layers.push(layer([file("big", vec![7u8; 16 << 20])]).compression(Compression::Gzip));
    let dir = f.path("layout");
    write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let res = flatfs()
        .args([
            "export".as_ref(),
            dir.as_os_str(),
            "-o".as_ref(),
            "-".as_ref(),
        ])
        .args(["--format", "rootfs", "--no-cache"])
        .stdout(full)
        .output()
        .expect("run flatfs");
    let stderr = assert_error(&res);
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(!stderr.contains("stage"), "{stderr}");
}

#[test]
fn unsupported_layer_media_types_are_named_in_the_error() {
    for media_type in [
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
    ] {
        let f = Fixture::new();
        let mut layers = f.layers.clone();
        layers[1] = layers[1].clone().media_type(media_type);
        let dir = f.path("odd");
        write_oci_layout(&layers, &default_config(&layers), &dir, Some(OCI_REF));
        let stderr = export_fails(&dir, &["--format", "rootfs"]);
        assert!(
            stderr.contains(media_type),
            "error should name media type {media_type}:\n{stderr}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let f = Fixture::new();
    let image = f.docker();
    let out = f.path("out.tar");
    let cases: Vec<Vec<&OsStr>> = vec![
        vec![],
        vec!["export".as_ref()],
        vec!["export".as_ref(), image.as_os_str()],
        vec![
            "export".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--format".as_ref(),
            "squashfs".as_ref(),
        ],
        vec![
            "export".as_ref(),
            image.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--compression".as_ref(),
            "lz4".as_ref(),
        ],
        vec!["no-such-command".as_ref()],
    ];
    for args in cases {
        let res = run_flatfs(&args);
        assert_eq!(
            res.status.code(),
            Some(2),
            "usage error {args:?} should exit 2; stderr:\n{}",
            stderr_of(&res)
        );
        assert!(!out.exists(), "usage error {args:?} wrote output");
    }
}

/// Regression: the temp file's 0600 used to survive the rename, so OUT was unreadable by others.
#[test]
fn output_modes_follow_the_umask_like_a_plain_redirect() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("in.tar");
    write_docker_archive(&sample_layers(), &default_config(&sample_layers()), &image);
    for (format, out) in [("docker-archive", "flat.tar"), ("oci", "layout")] {
        let out = tmp.path().join(out);
        let mut cmd = flatfs();
        cmd.args([
            "export",
            image.to_str().expect("utf-8"),
            "-o",
            out.to_str().expect("utf-8"),
            "--format",
            format,
        ]);
        // SAFETY: umask is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            });
        }
        let res = cmd.output().expect("run flatfs");
        assert_success(&res);
        let mode = std::fs::metadata(&out)
            .expect("OUT exists")
            .permissions()
            .mode()
            & 0o777;
        let want = if format == "oci" { 0o755 } else { 0o644 };
        assert_eq!(mode, want, "{format}: mode of {out:?}");
    }
}

/// `-o LINK`: the file the symlink points at is replaced; the link itself stays a link.
#[test]
fn output_through_a_symlink_replaces_its_target() {
    let f = Fixture::new();
    let image = f.docker();
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("real.tar");
    std::fs::write(&target, "old").expect("write target");
    let link = tmp.path().join("link.tar");
    std::os::unix::fs::symlink("real.tar", &link).expect("symlink");
    assert_success(&run_flatfs([
        OsStr::new("export"),
        image.as_os_str(),
        OsStr::new("-o"),
        link.as_os_str(),
    ]));
    let meta = std::fs::symlink_metadata(&link).expect("lstat link");
    assert!(
        meta.file_type().is_symlink(),
        "{link:?} is no longer a symlink"
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("real.tar"));
    read_docker(&output_files(&target));
}

/// `-o FIFO`: the image is streamed into the pipe, which is still a pipe afterwards.
#[test]
fn output_into_a_fifo_streams_to_its_reader() {
    use std::os::unix::fs::FileTypeExt;
    let f = Fixture::new();
    let image = f.docker();
    let tmp = tempfile::tempdir().expect("tempdir");
    let fifo = tmp.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).expect("read fifo"))
    };
    assert_success(&run_flatfs([
        OsStr::new("export"),
        image.as_os_str(),
        OsStr::new("-o"),
        fifo.as_os_str(),
    ]));
    // Checked before joining: had the FIFO been replaced, the reader would wait forever.
    let meta = std::fs::symlink_metadata(&fifo).expect("lstat fifo");
    assert!(meta.file_type().is_fifo(), "{fifo:?} was replaced");
    let got = reader.join().expect("reader thread");
    read_docker(&tar_files(&got));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "temp files left beside the FIFO: {left:?}");
}

/// `-o /dev/null` writes into the device (as root, a rename would replace it). As root the
/// test uses a private copy of the null device, so a regression cannot break the machine's.
#[test]
fn output_to_dev_null_keeps_the_device() {
    use std::os::unix::fs::FileTypeExt;
    let f = Fixture::new();
    let image = f.docker();
    let tmp = tempfile::tempdir().expect("tempdir");
    let null = if nix::unistd::geteuid().is_root() {
        let p = tmp.path().join("null");
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .expect("mknod null");
        p
    } else {
        PathBuf::from("/dev/null")
    };
    assert_success(&run_flatfs([
        OsStr::new("export"),
        image.as_os_str(),
        OsStr::new("-o"),
        null.as_os_str(),
    ]));
    let meta = std::fs::symlink_metadata(&null).expect("lstat null");
    assert!(meta.file_type().is_char_device(), "{null:?} was replaced");
}

/// `--tag` names an image; a rootfs tar has none, so asking for both is an error, not a
/// silently dropped flag.
#[test]
fn tag_with_rootfs_format_is_refused() {
    let f = Fixture::new();
    let stderr = export_fails(f.docker(), &["--format", "rootfs", "--tag", "a:b"]);
    assert!(stderr.contains("--tag"), "{stderr}");
}

/// Compressible bytes, different for every `seed`: words and runs of noise, like a layer's files.
fn words(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"/usr/lib/",
        b"python3",
        b"\n",
        b" ",
        b"libc.so.6",
        b"\0\0\0",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            out.extend((0..(x >> 8) % 24).map(|i| (x >> (i % 7 * 8)) as u8));
        } else {
            out.extend_from_slice(WORDS[(x >> 8) as usize % WORDS.len()]);
        }
    }
    out.truncate(len);
    out
}

#[test]
fn export_from_a_warm_index_decompresses_in_parallel_and_writes_the_same_tar() {
    let tmp = TempDir::new().expect("tempdir");
    // Big enough for several ranges per layer; files the upper layer replaces make the export
    // spill, so the parallel readers are read in a different order than the walk.
    let lower = layer((0..30).map(|i| file(format!("d/f{i:02}"), words(i, 400_000))))
        .compression(Compression::GzipMembers(3));
    let upper = layer(
        (20..45)
            .map(|i| file(format!("d/f{i:02}"), words(100 + i, 400_000)))
            .chain([file("a/first", b"first in the walk, last in the layer")]),
    )
    .compression(Compression::ZstdFrames(300_001));
    let layers = [lower, upper];
    let image = tmp.path().join("image");
    write_oci_layout(&layers, &default_config(&layers), &image, None);
    let cache = tmp.path().join("cache");
    let export = |name: &str| {
        let out_path = tmp.path().join(name);
        let out = flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .args(["-v", "export", "-q", "--format", "rootfs", "-o"])
            .arg(&out_path)
            .arg(&image)
            .output()
            .expect("run flatfs export");
        assert_success(&out);
        (std::fs::read(&out_path).expect("read tar"), stderr_of(&out))
    };
    let (cold, log) = export("cold.tar");
    assert!(!log.contains("decompressing on"), "{log}");
    // An export leaves no index of compressed layers in the cache; inspect does.
    assert_success(
        &flatfs()
            .env("FLATFS_CACHE_DIR", &cache)
            .args(["inspect", "--json"])
            .arg(&image)
            .output()
            .expect("run flatfs inspect"),
    );
    let (warm, log) = export("warm.tar");
    assert_eq!(log.matches("index from cache").count(), 2, "{log}");
    assert_eq!(log.matches("decompressing on").count(), 2, "{log}");
    assert!(cold == warm, "the tars differ");
    let files = tar_files(&warm);
    for i in 0..45u64 {
        let seed = if i < 20 { i } else { 100 + i };
        assert!(
            files[&format!("d/f{i:02}")] == words(seed, 400_000),
            "d/f{i:02}"
        );
    }
}
