//! Oracle tests: real images from `../shared/tools/make-images.sh`, exported in every format
//! and compared, after `umoci unpack` (or straight from the rootfs tar), with the merged tree
//! umoci computed from the original layers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Images are built once per test process; building is idempotent but takes seconds.
static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn shared_tools() -> Option<PathBuf> {
    let tools = crate::util::shared_tools_dir();
    tools.join("make-images.sh").exists().then_some(tools)
}

use crate::util::have;

/// The tools dir; panics, saying what is missing, when the test cannot run. These tests are
/// `#[ignore]`d: they run when asked for (scripts/test.sh does, with root and ../shared), so
/// a missing piece is a failure, never an `ok` that checked nothing.
fn prerequisites() -> PathBuf {
    let mut missing: Vec<&str> = ["umoci", "skopeo", "python3", "zstd"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    let tools = shared_tools();
    if tools.is_none() {
        missing.push("../shared/tools/make-images.sh (or FLATFS_SHARED_DIR)");
    }
    if !unsafe_is_root() {
        missing.push("root (make-images.sh needs mknod and chown)");
    }
    match tools {
        Some(tools) if missing.is_empty() => tools,
        _ => panic!("oracle test needs: {}", missing.join(", ")),
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds `name` with make-images.sh into a directory shared by the tests of this run.
fn image_dir(tools: &Path, name: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("shared-images");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        run(Command::new(tools.join("make-images.sh"))
            .arg(&out)
            .arg(name));
        built.push(name.to_string());
    }
    out
}

fn flatfs(args: &[&str]) {
    run(Command::new(env!("CARGO_BIN_EXE_flatfs")).args(args));
}

fn tree_manifest(tools: &Path, root: &Path) -> String {
    run(Command::new("python3")
        .arg(tools.join("tree-manifest.py"))
        .arg("--hardlinks")
        .arg(root))
}

fn tar_manifest(tools: &Path, tar: &Path) -> String {
    run(Command::new("python3")
        .arg(tools.join("tar-manifest.py"))
        .arg("--hardlinks")
        .arg(tar))
}

fn assert_same(what: &str, got: &str, want: &str) {
    if got != want {
        let diff: Vec<String> = got
            .lines()
            .filter(|l| !want.lines().any(|w| w == *l))
            .map(|l| format!("+ {l}"))
            .chain(
                want.lines()
                    .filter(|l| !got.lines().any(|g| g == *l))
                    .map(|l| format!("- {l}")),
            )
            .take(40)
            .collect();
        panic!(
            "{what}: merged tree differs from umoci's (+ flatfs, - expected):\n{}",
            diff.join("\n")
        );
    }
}

/// Unpacks an OCI layout with umoci and lists its rootfs.
fn umoci_listing(tools: &Path, layout: &Path, work: &Path) -> String {
    let bundle = work.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle));
    let listing = tree_manifest(tools, &bundle.join("rootfs"));
    std::fs::remove_dir_all(&bundle).expect("remove bundle");
    listing
}

fn check_image(name: &str) {
    let tools = prerequisites();
    let dir = image_dir(&tools, name);
    let expected = std::fs::read_to_string(dir.join(format!("{name}.expected.txt")))
        .expect("expected listing");
    let work = tempfile::tempdir().expect("tempdir");
    let inputs = [
        format!("{}/{name}.docker.tar", dir.display()),
        format!("{}/{name}.oci.tar", dir.display()),
        format!("{}/{name}:latest", dir.display()),
    ];
    for input in &inputs {
        // rootfs: compare the tar itself.
        let rootfs = work.path().join("rootfs.tar");
        flatfs(&[
            "export",
            input,
            "-o",
            rootfs.to_str().expect("utf-8 path"),
            "--format",
            "rootfs",
        ]);
        assert_same(
            &format!("{input} as rootfs"),
            &tar_manifest(&tools, &rootfs),
            &expected,
        );
    }
    let input = &inputs[1];
    // docker-archive: skopeo turns it into a layout for umoci.
    let docker = work.path().join("flat.docker.tar");
    flatfs(&[
        "export",
        input,
        "-o",
        docker.to_str().expect("utf-8"),
        "--format",
        "docker-archive",
    ]);
    let layout = work.path().join("from-docker");
    run(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!("docker-archive:{}", docker.display()))
        .arg(format!("oci:{}:latest", layout.display())));
    assert_same(
        "docker-archive via skopeo + umoci",
        &umoci_listing(&tools, &layout, work.path()),
        &expected,
    );

    // oci-archive and oci (gzip): umoci reads them directly.
    let archive = work.path().join("flat.oci.tar");
    flatfs(&[
        "export",
        input,
        "-o",
        archive.to_str().expect("utf-8"),
        "--format",
        "oci-archive",
    ]);
    let layout = work.path().join("from-archive");
    run(Command::new("skopeo")
        .arg("copy")
        .arg("-q")
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("oci:{}:latest", layout.display())));
    assert_same(
        "oci-archive via skopeo + umoci",
        &umoci_listing(&tools, &layout, work.path()),
        &expected,
    );

    let layout = work.path().join("flat-layout");
    flatfs(&[
        "export",
        &inputs[0],
        "-o",
        layout.to_str().expect("utf-8"),
        "--format",
        "oci",
    ]);
    assert_same(
        "oci layout via umoci",
        &umoci_listing(&tools, &layout, work.path()),
        &expected,
    );

    // zstd: umoci cannot read it, so check the layer blob's tar after `zstd -d`.
    let layout = work.path().join("flat-zstd");
    flatfs(&[
        "export",
        &inputs[2],
        "-o",
        layout.to_str().expect("utf-8"),
        "--format",
        "oci",
        "--compression",
        "zstd",
    ]);
    run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:latest", layout.display())));
    let blobs = layout.join("blobs/sha256");
    let mut checked = false;
    for blob in std::fs::read_dir(&blobs).expect("blobs") {
        let blob = blob.expect("blob").path();
        let magic = std::fs::read(&blob).expect("read blob");
        if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let tar = work.path().join("zstd-layer.tar");
            run(Command::new("sh").arg("-c").arg(format!(
                "zstd -dc '{}' > '{}'",
                blob.display(),
                tar.display()
            )));
            assert_same("zstd layer", &tar_manifest(&tools, &tar), &expected);
            checked = true;
        }
    }
    assert!(checked, "no zstd layer blob in {}", blobs.display());
}

#[test]
#[ignore = "needs root and ../shared/tools/make-images.sh: scripts/test.sh runs it when both are there"]
fn hello_image_exports_match_umoci_in_every_format() {
    check_image("hello");
}

#[test]
#[ignore = "builds a Debian image with debootstrap (~2.5 min, needs the apt mirror): FLATFS_TEST_DEBIAN=1 scripts/test.sh runs it, as .ci/run does"]
fn debian_image_exports_match_umoci_in_every_format() {
    check_image("debian");
}

/// The layer of `merge::same_layer_symlinks`, unpacked by umoci, against flatfs's rootfs:
/// within one layer, entries go through the symlinks it made earlier, as umoci puts them.
#[test]
#[ignore = "needs root and ../shared/tools: scripts/test.sh runs it when both are there"]
fn same_layer_symlinks_resolve_as_umoci_unpacks_them() {
    let tools = prerequisites();
    let work = tempfile::tempdir().expect("tempdir");
    let layers = vec![crate::merge::same_layer_symlinks()];
    let layout = work.path().join("layout");
    crate::util::write_oci_layout(
        &layers,
        &crate::util::default_config(&layers),
        &layout,
        Some("latest"),
    );
    let rootfs = work.path().join("rootfs.tar");
    flatfs(&[
        "export",
        layout.to_str().expect("utf-8 path"),
        "-o",
        rootfs.to_str().expect("utf-8 path"),
        "--format",
        "rootfs",
    ]);
    // The root's metadata is umoci's own (a bundle directory), not the layer's.
    let without_root = |l: String| -> String {
        l.lines()
            .filter(|l| !l.starts_with(".\t"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_same(
        "same-layer symlinks",
        &without_root(tar_manifest(&tools, &rootfs)),
        &without_root(umoci_listing(&tools, &layout, work.path())),
    );
}
