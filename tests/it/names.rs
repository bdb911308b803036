//! Image names end to end: the name an export writes comes from `--tag`, the input's tags or
//! its file, is checked by the reference grammar, and is one `podman load` and skopeo accept.
//! See: issue 11, bugs 1 and 2.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::*;

/// `program`, which scripts/test.sh installs: a test that needs it fails without it.
#[track_caller]
fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test needs {program} (scripts/test.sh installs it)"
    );
}

fn two_layers() -> Vec<Layer> {
    vec![
        layer([dir("etc"), file("etc/a", "a")]),
        layer([file("etc/b", "b")]),
    ]
}

/// One member of a tar archive.
fn member(tar: &Path, name: &str) -> Value {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(tar)
        .arg(name)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "no {name} in {}", tar.display());
    serde_json::from_slice(&out.stdout).expect("member is JSON")
}

/// The names an export wrote: (`RepoTags`, or `io.containerd.image.name` and `ref.name`).
fn written_names(out: &Path) -> (Option<Value>, Option<Value>, Option<Value>) {
    let listing = Command::new("tar").arg("-tf").arg(out).output().unwrap();
    if String::from_utf8_lossy(&listing.stdout)
        .lines()
        .any(|l| l == "manifest.json")
    {
        let m = member(out, "manifest.json");
        (Some(m[0]["RepoTags"].clone()), None, None)
    } else {
        let a = member(out, "index.json")["manifests"][0]["annotations"].clone();
        (
            None,
            Some(a["io.containerd.image.name"].clone()),
            Some(a["org.opencontainers.image.ref.name"].clone()),
        )
    }
}

fn export(image: &Path, out: &Path, args: &[&str]) -> std::process::Output {
    flatfs()
        .arg("export")
        .arg(image)
        .arg("-o")
        .arg(out)
        .args(args)
        .output()
        .expect("run flatfs")
}

/// A podman with its storage in `dir`, loading `archive`; returns what it named the image.
fn podman_load(dir: &Path, archive: &Path) -> String {
    let out = Command::new("podman")
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs", "load", "-i"])
        .arg(archive)
        .output()
        .expect("run podman");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman load {} failed:\n{}{stdout}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap_or_else(|| panic!("podman said no name:\n{stdout}"))
        .to_string()
}

#[test]
fn dir_ref_input_names_the_output_after_the_dir() {
    require("podman");
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let layout = tmp.path().join("layout");
    write_oci_layout(&layers, &default_config(&layers), &layout, Some("v2"));
    let spec = format!("{}:v2", layout.display());

    let oci = tmp.path().join("flat.oci.tar");
    assert_success(&export(
        Path::new(&spec),
        &oci,
        &["--format", "oci-archive"],
    ));
    let (_, full, reference) = written_names(&oci);
    assert_eq!(full.unwrap(), "docker.io/library/layout:v2");
    assert_eq!(reference.unwrap(), "v2");
    assert_eq!(podman_load(tmp.path(), &oci), "docker.io/library/layout:v2");

    let docker = tmp.path().join("flat.docker.tar");
    assert_success(&export(
        Path::new(&spec),
        &docker,
        &["--format", "docker-archive"],
    ));
    assert_eq!(
        written_names(&docker).0.unwrap(),
        serde_json::json!(["layout:v2"])
    );
    podman_load(tmp.path(), &docker);

    let inspect = run_flatfs(["inspect", &spec]);
    assert_success(&inspect);
    let text = String::from_utf8_lossy(&inspect.stdout);
    let tags = text.lines().find(|l| l.starts_with("Tags:")).unwrap_or("");
    assert_eq!(tags.split_whitespace().nth(1), Some("layout:v2"), "{text}");
}

#[test]
fn bad_tag_is_a_usage_error_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    // No image at all: the tag is refused before the input is even opened.
    let missing = tmp.path().join("no-such-image.tar");
    for (tag, says) in [
        ("Bad Tag!!", "lowercase"),
        ("app@sha256:abc", "digest"),
        ("app:", "empty tag"),
        ("app:-x", "bad tag"),
        ("-app", "bad name component"),
        ("localhost:port/x", "registry host"),
    ] {
        let out_path = tmp.path().join("out.tar");
        let out = export(&missing, &out_path, &[&format!("--tag={tag}")]);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "--tag {tag:?}: {stderr}");
        assert!(
            stderr.contains("--tag") && stderr.contains(says),
            "--tag {tag:?} should say {says:?}:\n{stderr}"
        );
        assert!(!out_path.exists());
    }
}

#[test]
fn tag_flag_is_normalised_like_docker_and_loads_in_podman() {
    require("podman");
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let image = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &image);
    for (tag, repo_tag, full) in [
        ("app", "app:latest", "docker.io/library/app:latest"),
        ("me/app:1.0", "me/app:1.0", "docker.io/me/app:1.0"),
        (
            "index.docker.io/library/app:2",
            "app:2",
            "docker.io/library/app:2",
        ),
        (
            "localhost:5000/team/app",
            "localhost:5000/team/app:latest",
            "localhost:5000/team/app:latest",
        ),
    ] {
        let docker = tmp.path().join("out.docker.tar");
        assert_success(&export(&image, &docker, &["--tag", tag]));
        assert_eq!(
            written_names(&docker).0.unwrap(),
            serde_json::json!([repo_tag]),
            "--tag {tag}"
        );
        let oci = tmp.path().join("out.oci.tar");
        assert_success(&export(
            &image,
            &oci,
            &["--tag", tag, "--format", "oci-archive"],
        ));
        assert_eq!(written_names(&oci).1.unwrap(), full, "--tag {tag}");
        assert_eq!(podman_load(tmp.path(), &oci), full);
    }
}

/// skopeo parses a docker-archive destination's name with Docker's own reference code: it
/// accepts exactly the names flatfs accepts, and normalises them to the same full form.
#[test]
fn tag_validation_agrees_with_skopeo() {
    require("skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let image = tmp.path().join("in.oci.tar");
    write_oci_archive(&layers, &default_config(&layers), &image);
    let long_tag = format!("app:{}", "t".repeat(128));
    let too_long_tag = format!("app:{}", "t".repeat(129));
    let long_name = format!("h.com/{}", "a".repeat(249));
    let too_long_name = format!("h.com/{}", "a".repeat(250));
    // Not here: `[::1]:5000/x` (this skopeo's grammar predates IPv6 hosts) and `a.b_c/x` (a
    // host name Docker's regular expression lets through as a path; see src/reference.rs).
    let names = [
        "app",
        "app:1.0",
        "me/app",
        "docker.io/app",
        "index.docker.io/me/app:v",
        "localhost/app",
        "localhost:5000/x",
        "localhost:5000",
        "reg.example.com:443/a/b/c:t",
        "Example.COM/app",
        "my-app_1.x:_",
        "a__b/c---d/e.f_g",
        &long_tag,
        &long_name,
        "App",
        "me/App",
        "Bad Tag!!",
        "app:",
        "app:.x",
        "app:-x",
        &too_long_tag,
        &too_long_name,
        "-app",
        "app-",
        "a..b",
        "a___b",
        "a//b",
        "localhost:port/x",
        "-h.com/x",
    ];
    for name in names {
        let skopeo_out = tmp.path().join("skopeo.tar");
        let _ = std::fs::remove_file(&skopeo_out);
        let skopeo = Command::new("skopeo")
            .args(["copy", "-q"])
            .arg(format!("oci-archive:{}", image.display()))
            .arg(format!("docker-archive:{}:{name}", skopeo_out.display()))
            .output()
            .expect("run skopeo");
        let ours = tmp.path().join("ours.oci.tar");
        let flatfs = export(&image, &ours, &["--tag", name, "--format", "oci-archive"]);
        assert_eq!(
            flatfs.status.success(),
            skopeo.status.success(),
            "{name:?}: flatfs and skopeo disagree\nflatfs: {}\nskopeo: {}",
            stderr_of(&flatfs),
            String::from_utf8_lossy(&skopeo.stderr)
        );
        if skopeo.status.success() {
            let skopeo_name = member(&skopeo_out, "manifest.json")[0]["RepoTags"][0].clone();
            assert_eq!(written_names(&ours).1.unwrap(), skopeo_name, "{name:?}");
        }
    }
}

#[test]
fn file_stems_name_the_image_only_when_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let config = default_config(&layers);
    let good: PathBuf = tmp.path().join("Demo-App.oci.tar");
    write_oci_archive(&layers, &config, &good);
    let out = tmp.path().join("a.tar");
    let res = export(&good, &out, &["--format", "docker-archive"]);
    assert_success(&res);
    assert_eq!(
        written_names(&out).0.unwrap(),
        serde_json::json!(["demo-app:latest"])
    );
    assert!(!stderr_of(&res).contains("warning"), "{}", stderr_of(&res));

    let bad = tmp.path().join("My Image.oci.tar");
    write_oci_archive(&layers, &config, &bad);
    let res = export(&bad, &out, &["--format", "docker-archive"]);
    assert_success(&res);
    assert_eq!(written_names(&out).0.unwrap(), Value::Null);
    let stderr = stderr_of(&res);
    assert!(
        stderr.contains("warning") && stderr.contains("My Image.oci.tar"),
        "say that the file name is not used:\n{stderr}"
    );
    // --tag names it anyway.
    let res = export(&bad, &out, &["--format", "docker-archive", "--tag", "mine"]);
    assert_success(&res);
    assert_eq!(
        written_names(&out).0.unwrap(),
        serde_json::json!(["mine:latest"])
    );
}

/// A docker archive whose RepoTags are no valid names (hand-edited, or from a broken tool):
/// the output is left unnamed, with a warning, rather than named something podman refuses.
#[test]
fn invalid_input_tags_are_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let bytes = docker_archive_bytes(&layers, &default_config(&layers));
    // Rewrite manifest.json's RepoTags, keeping every other member as it is.
    let mut rebuilt = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if path.to_str() == Some("manifest.json") {
            let mut m: Value = serde_json::from_slice(&data).unwrap();
            m[0]["RepoTags"] = serde_json::json!(["Bad Name:1", "x:"]);
            data = serde_json::to_vec(&m).unwrap();
        }
        let mut header = entry.header().clone();
        header.set_size(data.len() as u64);
        header.set_cksum();
        rebuilt.append(&header, data.as_slice()).unwrap();
    }
    let img = tmp.path().join("bad-tags.docker.tar");
    std::fs::write(&img, rebuilt.into_inner().unwrap()).unwrap();
    let out = tmp.path().join("out.oci.tar");
    let res = export(&img, &out, &["--format", "oci-archive"]);
    assert_success(&res);
    let (_, full, reference) = written_names(&out);
    assert_eq!(full, Some(Value::Null), "no io.containerd.image.name");
    assert_eq!(reference.unwrap(), "latest");
    let stderr = stderr_of(&res);
    assert!(
        stderr.contains("warning") && stderr.contains("Bad Name:1") && stderr.contains("--tag"),
        "{stderr}"
    );
}
