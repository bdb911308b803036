//! `docker://` images against a real registry (issue 12): every command gives the same answer
//! as on the image as a file; platforms, errors, the blob store, skopeo's local transports,
//! faults (retries, resume, corrupt bytes), push, auth and TLS.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::registry_harness::*;
use crate::util::*;

/// Three layers: a file deleted by a whiteout, a file changed, a hardlink, a symlink, an
/// opaque directory; gzip and plain layers.
fn layers() -> Vec<Layer> {
    vec![
        layer([
            dir("etc"),
            file("etc/big.bin", vec![7u8; 300_000]),
            file("etc/small.txt", b"v1\n"),
            dir("opt/old"),
            file("opt/old/gone.txt", b"gone\n"),
            symlink("etc/link", "/data/target.txt"),
        ]),
        layer([
            whiteout("etc/big.bin"),
            file("etc/small.txt", b"version 2\n"),
            hardlink("etc/small-again.txt", "etc/small.txt"),
            opaque("opt/old"),
            file("opt/old/new.txt", b"new\n"),
        ])
        .compression(Compression::Gzip),
        layer([dir("data"), file("data/target.txt", b"through the link\n")])
            .compression(Compression::None),
    ]
}

/// Writes the test image as an OCI layout `DIR` (ref `latest`).
fn image(at: &Path) -> PathBuf {
    let layers = layers();
    let path = at.join("img");
    write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    path
}

/// Runs flatfs with its own cache dir; registry options after the command's own.
struct Runner {
    cache: PathBuf,
}

impl Runner {
    fn new(at: &Path) -> Runner {
        Runner {
            cache: at.join("cache"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
        flatfs()
            .env("FLATFS_CACHE_DIR", &self.cache)
            .env("FLATFS_REGISTRY_TIMEOUT", "10")
            // No auth file of the machine's may leak into a test.
            .env("HOME", &self.cache)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG")
            .envs(env.iter().copied())
            .args(args)
            .output()
            .expect("run flatfs")
    }

    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert_success(&out);
        out.stdout
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "flatfs {args:?} should have failed; stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// `inspect --json` without the fields that name the source.
fn inspect_sans_source(json: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(json).expect("inspect json");
    let o = v.as_object_mut().expect("object");
    for k in ["image", "format", "tags"] {
        o.remove(k);
    }
    v
}

#[test]
fn registry_every_command_matches_the_file() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    // skopeo compresses the plain layer on the way in: the image in the registry is the one
    // skopeo copies back out.
    let copy = tmp.path().join("copy");
    reg.pull_layout("team/app:1.0", &copy);
    let local = copy.to_str().unwrap();
    let remote = reg.url("team/app:1.0");
    let r = Runner::new(tmp.path());
    let insecure = "--tls-verify=false";

    for args in [
        vec!["ls", "-R", "-l"],
        vec!["ls", "-R", "--layers", "1"],
        vec!["cat", "etc/link"],
        vec!["cat", "etc/small-again.txt"],
        vec!["diff", "2"],
    ] {
        let (cmd, rest) = args.split_first().unwrap();
        let mut on_file = vec![*cmd, local];
        on_file.extend(rest);
        let mut on_reg = vec![*cmd, &remote, insecure];
        on_reg.extend(rest);
        assert_eq!(
            String::from_utf8_lossy(&r.ok(&on_reg)),
            String::from_utf8_lossy(&r.ok(&on_file)),
            "{args:?}"
        );
    }
    let remote_json = r.ok(&["inspect", "--json", &remote, insecure]);
    let v: Value = serde_json::from_slice(&remote_json).unwrap();
    assert_eq!(v["format"], "registry");
    assert_eq!(v["tags"][0], format!("{}/team/app:1.0", reg.host));
    assert_eq!(
        inspect_sans_source(&remote_json),
        inspect_sans_source(&r.ok(&["inspect", "--json", local]))
    );
    let (a, b) = (tmp.path().join("a.tar"), tmp.path().join("b.tar"));
    r.ok(&[
        "export",
        &remote,
        insecure,
        "--format",
        "rootfs",
        "-o",
        a.to_str().unwrap(),
    ]);
    r.ok(&[
        "export",
        local,
        "--format",
        "rootfs",
        "-o",
        b.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "rootfs exports differ"
    );

    // The blobs are in the store, shown and cleared by `flatfs cache`.
    let ls = String::from_utf8(r.ok(&["cache", "ls"])).unwrap();
    assert_eq!(
        ls.matches("blob (pulled)").count(),
        5,
        "manifest, config, 3 layers:\n{ls}"
    );
    r.ok(&["cache", "clear"]);
    let ls = String::from_utf8(r.ok(&["cache", "ls"])).unwrap();
    assert!(!ls.contains("blob"), "{ls}");
}

/// Pushes `repo:tag`, an index of two images, `which` saying `amd64` or `arm64`, arm64
/// behind a nested index, amd64 with Docker media types.
fn push_multi(reg: &Registry, at: &Path, repo: &str, tag: &str) {
    // Two platforms, arm64 behind a nested index; Docker media types for one of them.
    // skopeo does not push nested indexes: the blobs and documents go in by hand.
    let mut oci = OciLayout::new();
    let amd = vec![layer([file("which", b"amd64\n")])];
    let arm = vec![layer([file("which", b"arm64\n")])];
    let mut amd_config = default_config(&amd);
    amd_config["architecture"] = "amd64".into();
    let mut arm_config = default_config(&arm);
    arm_config["architecture"] = "arm64".into();
    let (amd_desc, _) = oci.add_docker_image(&amd, &amd_config);
    let (arm_desc, _) = oci.add_image(&arm, &arm_config);
    let nested = oci.add_index(vec![with_platform(
        arm_desc.clone(),
        "linux",
        "arm64",
        None,
    )]);
    let top = oci.add_index(vec![
        with_platform(amd_desc.clone(), "linux", "amd64", None),
        nested.clone(),
    ]);
    let layout = at.join("multi");
    oci.write_dir(&layout);
    let blob_dir = layout.join("blobs/sha256");
    let bytes_of = |desc: &Value| {
        let digest = desc["digest"].as_str().unwrap();
        std::fs::read(blob_dir.join(digest.trim_start_matches("sha256:"))).unwrap()
    };
    let docs: Vec<(String, String, Vec<u8>)> = [&amd_desc, &arm_desc, &nested, &top]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let reference = if i == 3 {
                tag.to_string()
            } else {
                d["digest"].as_str().unwrap().to_string()
            };
            (
                reference,
                d["mediaType"].as_str().unwrap().to_string(),
                bytes_of(d),
            )
        })
        .collect();
    let doc_digests: Vec<&str> = [&amd_desc, &arm_desc, &nested, &top]
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    let blobs: Vec<Vec<u8>> = std::fs::read_dir(&blob_dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !doc_digests.iter().any(|d| d.ends_with(&name))
        })
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    reg.put_raw(repo, &blobs, &docs);
}

#[test]
fn registry_index_gives_the_wanted_platform_and_nested_indexes_resolve() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_multi(&reg, tmp.path(), "multi", "1");

    let r = Runner::new(tmp.path());
    let remote = reg.url("multi:1");
    for arch in ["amd64", "arm64"] {
        let platform = format!("linux/{arch}");
        let out = r.ok(&[
            "cat",
            &remote,
            "which",
            "--platform",
            &platform,
            "--tls-verify=false",
        ]);
        assert_eq!(String::from_utf8_lossy(&out), format!("{arch}\n"));
    }
    let err = r.fails(&[
        "ls",
        &remote,
        "--platform",
        "linux/s390x",
        "--tls-verify=false",
    ]);
    assert!(
        err.contains("no manifest for platform linux/s390x"),
        "{err}"
    );
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn registry_errors_name_the_host_and_what_failed() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let r = Runner::new(tmp.path());
    let host = &reg.host;

    let err = r.fails(&["ls", &reg.url("team/app:nope"), "--tls-verify=false"]);
    assert!(
        err.contains(&format!("registry {host}: GET manifest team/app:nope: 404"))
            && err.contains("MANIFEST_UNKNOWN"),
        "{err}"
    );
    let err = r.fails(&["ls", &reg.url("team/nothing:1"), "--tls-verify=false"]);
    assert!(err.contains("GET manifest team/nothing:1: 404"), "{err}");
    // Plain HTTP without --tls-verify=false: the TLS handshake fails, and the error says so.
    let err = r.fails(&["ls", &reg.url("team/app:1.0")]);
    assert!(
        err.contains(&format!("registry {host}")) && err.contains("TLS"),
        "{err}"
    );
    assert!(err.contains("--tls-verify=false"), "{err}");
    // Nobody listening.
    let port = free_port();
    let err = r.fails(&[
        "ls",
        &format!("docker://127.0.0.1:{port}/a:1"),
        "--tls-verify=false",
    ]);
    assert!(
        err.contains(&format!("registry 127.0.0.1:{port}")) && err.contains("cannot connect"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
    // A reference the grammar refuses never reaches the network.
    let err = r.fails(&["ls", "docker://127.0.0.1:1/Bad/Name"]);
    assert!(err.contains("lowercase"), "{err}");
}

#[test]
fn skopeo_transports_name_local_images() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = layers();
    let config = default_config(&layers);
    let dir = tmp.path().join("layout");
    write_oci_layout(&layers, &config, &dir, Some("v1"));
    let archive = tmp.path().join("img.oci.tar");
    let mut oci = OciLayout::new();
    let (desc, _) = oci.add_image(&layers, &config);
    oci.add_index_entry(with_annotations(
        desc,
        &[("org.opencontainers.image.ref.name", "v1")],
    ));
    oci.write_archive(&archive);
    let docker = tmp.path().join("img.docker.tar");
    write_docker_archive(&layers, &config, &docker);
    let r = Runner::new(tmp.path());
    let want = r.ok(&["ls", "-R", dir.to_str().unwrap()]);
    for spec in [
        format!("oci:{}", dir.display()),
        format!("oci:{}:v1", dir.display()),
        format!("oci-archive:{}:v1", archive.display()),
        format!("oci-archive:{}", archive.display()),
        format!("docker-archive:{}", docker.display()),
    ] {
        assert_eq!(r.ok(&["ls", "-R", &spec]), want, "{spec}");
    }
    let err = r.fails(&["ls", &format!("oci:{}:nope", dir.display())]);
    assert!(err.contains("nope"), "{err}");
    let err = r.fails(&["ls", &format!("docker-archive:{}", archive.display())]);
    assert!(err.contains("not a docker-archive"), "{err}");
}

/// An image with one layer of 1 MiB that does not compress, so a connection can drop in the
/// middle of its blob; returns the layout and that layer's digest.
fn big_image(at: &Path) -> (PathBuf, String) {
    let noise = noise(0x9e37_79b9_7f4a_7c15, 1 << 20);
    let layers = vec![
        layer([dir("data"), file("data/noise.bin", noise)]).compression(Compression::Gzip),
        layer([file("data/small.txt", b"small\n")]).compression(Compression::Gzip),
    ];
    let path = at.join("big");
    let written = write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    (path, written.layer_digests[0].clone())
}

#[test]
fn registry_pull_retries_5xx_and_429_and_resumes_a_dropped_blob() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, big) = big_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "big:1");
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Status {
        path: "/manifests/".into(),
        status: 503,
        retry_after: None,
        times: 1,
    });
    proxy.inject(Fault::Status {
        path: format!("/blobs/{big}"),
        status: 429,
        retry_after: Some(1),
        times: 1,
    });
    proxy.inject(Fault::Drop {
        path: format!("/blobs/{big}"),
        after: 300_000,
        times: 2,
    });
    let r = Runner::new(tmp.path());
    let got = r.ok(&["ls", "-R", "-l", &proxy.url("big:1"), "--tls-verify=false"]);
    assert_eq!(got, r.ok(&["ls", "-R", "-l", img.to_str().unwrap()]));
    let gets: Vec<Seen> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with(&format!("/blobs/{big}")))
        .collect();
    let ranges: Vec<Option<&str>> = gets.iter().map(|s| s.header("range")).collect();
    assert_eq!(
        ranges,
        vec![None, None, Some("bytes=300000-"), Some("bytes=600000-")],
        "429, then a drop at 300000, resumed and dropped again at 600000, then the rest"
    );
    assert_eq!(
        String::from_utf8_lossy(&r.ok(&[
            "cat",
            &proxy.url("big:1"),
            "data/small.txt",
            "--tls-verify=false"
        ])),
        "small\n"
    );
}

#[test]
fn registry_corrupt_blob_is_caught_and_never_enters_the_store() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, big) = big_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "big:1");
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{big}"),
        times: 100,
    });
    let r = Runner::new(tmp.path());
    let err = r.fails(&["ls", &proxy.url("big:1"), "--tls-verify=false"]);
    assert!(
        err.contains(&format!("registry {}", proxy.host))
            && err.contains(&format!("GET blob big@{big}"))
            && err.contains("digest mismatch"),
        "{err}"
    );
    let hex = big.trim_start_matches("sha256:");
    let store = r.cache.join("blobs/sha256");
    let names: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n == hex),
        "corrupt blob stored: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with(".tmp")),
        "temp left: {names:?}"
    );
    // Straight from the registry, the same blob is fine and enters the store.
    r.ok(&["ls", &reg.url("big:1"), "--tls-verify=false"]);
    assert!(store.join(hex).is_file());
}

/// `../shared/tools` (or `$FLATFS_SHARED_DIR/tools`), for tree-manifest.py.
fn shared_tools() -> PathBuf {
    let tools = shared_tools_dir();
    // Only run when asked for (#[ignore]d): then a missing piece fails.
    assert!(
        tools.join("tree-manifest.py").exists(),
        "registry oracle test needs ../shared/tools (or FLATFS_SHARED_DIR)"
    );
    tools
}

/// The merged tree `umoci unpack` makes of `layout:latest`, as tree-manifest.py lists it.
fn umoci_tree(tools: &Path, layout: &Path, work: &Path) -> String {
    let bundle = work.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    let ok = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    ok(std::process::Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle));
    let listing = ok(std::process::Command::new("python3")
        .arg(tools.join("tree-manifest.py"))
        .arg("--hardlinks")
        .arg(bundle.join("rootfs")));
    std::fs::remove_dir_all(&bundle).expect("remove bundle");
    listing
}

#[test]
#[ignore = "needs ../shared/tools: scripts/test.sh runs it with the oracle tests"]
fn registry_to_registry_export_pulls_back_as_umoci_merges_the_original() {
    registry_tools(&["umoci", "python3"]);
    let tools = shared_tools();
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let r = Runner::new(tmp.path());
    let out = r.run(&[
        "export",
        &reg.url("team/app:1.0"),
        "-o",
        &reg.url("team/flat:1"),
        "--tls-verify=false",
    ]);
    assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 blobs uploaded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reg.tags("team/flat"), vec!["1"]);

    let (orig, flat) = (tmp.path().join("orig"), tmp.path().join("flat"));
    reg.pull_layout("team/app:1.0", &orig);
    reg.pull_layout("team/flat:1", &flat);
    let want = umoci_tree(&tools, &orig, tmp.path());
    let got = umoci_tree(&tools, &flat, tmp.path());
    assert_eq!(
        got, want,
        "the pushed image unpacks to the original's merged tree"
    );
    let info: Value = serde_json::from_slice(&r.ok(&[
        "inspect",
        "--json",
        &reg.url("team/flat:1"),
        "--tls-verify=false",
    ]))
    .unwrap();
    assert_eq!(info["layers"].as_array().unwrap().len(), 1);
    assert_eq!(info["config"]["cmd"][0], "cat /message.txt");

    // Again, from the flat image to another repository through a proxy (same registry host):
    // its layer is the same bytes, so it is mounted, not uploaded.
    let proxy = FaultProxy::start(&reg.host);
    r.ok(&[
        "export",
        &proxy.url("team/flat:1"),
        "-o",
        &proxy.url("team/again:1"),
        "--tls-verify=false",
    ]);
    let layer = info["layers"][0]["digest"].as_str().unwrap().to_string();
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|s| s.method == "POST"
            && s.path.contains(&format!("mount={layer}"))
            && s.path.contains("from=team/flat")),
        "a mount was asked for: {seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.method == "PUT" && s.path.contains(&format!("digest={layer}"))),
        "the layer was uploaded instead of mounted"
    );
    assert_eq!(reg.tags("team/again"), vec!["1"]);
}

#[test]
fn registry_failed_push_leaves_no_tag() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    let proxy = FaultProxy::start(&reg.host);
    let r = Runner::new(tmp.path());
    // Uploads fail (500, retried at once as Retry-After says, until the tries run out).
    proxy.inject(Fault::Status {
        path: "/blobs/uploads/".into(),
        status: 500,
        retry_after: Some(0),
        times: 1000,
    });
    let err = r.fails(&[
        "export",
        img.to_str().unwrap(),
        "-o",
        &proxy.url("team/broken:1"),
        "--tls-verify=false",
    ]);
    assert!(
        err.contains(&format!("registry {}", proxy.host)) && err.contains("500"),
        "{err}"
    );
    assert!(reg.tags("team/broken").is_empty());
    // The blobs go in, but the connection drops on the manifest PUT: still no tag.
    let proxy = FaultProxy::start(&reg.host);
    proxy.inject(Fault::Refuse {
        path: "/manifests/1".into(),
        times: 1000,
    });
    let err = r.fails(&[
        "export",
        img.to_str().unwrap(),
        "-o",
        &proxy.url("team/broken:1"),
        "--tls-verify=false",
    ]);
    assert!(err.contains("PUT manifest team/broken:1"), "{err}");
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.method == "PUT" && s.path.contains("digest="))
    );
    assert!(reg.tags("team/broken").is_empty());
}

#[test]
fn registry_basic_auth_over_tls_takes_credentials_from_each_place() {
    registry_tools(&["htpasswd", "openssl"]);
    let reg = Registry::start_secured();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let s = reg.secured.as_ref().unwrap();
    let url = reg.url("team/app:1.0");
    let certs = s.cert_dir.to_str().unwrap();
    let r = Runner::new(tmp.path());
    let host = &reg.host;
    let want = r.ok(&["ls", "-R", img.to_str().unwrap()]);

    // No credentials: the registry's 401, named.
    let err = r.fails(&["ls", &url, "--cert-dir", certs]);
    assert!(
        err.contains(&format!("registry {host}")) && err.contains("401"),
        "{err}"
    );
    // Without the CA the certificate is not trusted.
    let creds = tmp.path().join("creds");
    std::fs::write(&creds, format!("{}:{}\n", s.user, s.password)).unwrap();
    let creds = creds.to_str().unwrap();
    let err = r.fails(&["ls", &url, "--creds-file", creds]);
    assert!(
        err.contains(&format!("registry {host}")) && err.contains("TLS"),
        "{err}"
    );
    // With it, and the right credentials.
    assert_eq!(
        r.ok(&["ls", "-R", &url, "--cert-dir", certs, "--creds-file", creds]),
        want
    );
    // The same line on standard input.
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", &r.cache)
        .env("HOME", &r.cache)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG")
        .args(["ls", "-R", &url, "--cert-dir", certs, "--creds-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            writeln!(stdin, "{}:{}", s.user, s.password)?;
            drop(stdin);
            child.wait_with_output()
        })
        .expect("run flatfs");
    assert_success(&out);
    assert_eq!(out.stdout, want, "credentials from standard input");
    // --tls-verify=false accepts the unverified certificate.
    assert_eq!(
        r.ok(&[
            "ls",
            "-R",
            &url,
            "--tls-verify=false",
            "--creds-file",
            creds
        ]),
        want
    );
    // Wrong password.
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, format!("{}:nope\n", s.user)).unwrap();
    let err = r.fails(&[
        "ls",
        &url,
        "--cert-dir",
        certs,
        "--creds-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(err.contains("401"), "{err}");

    // Auth files, in each place skopeo looks.
    let auth = format!(
        r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
        base64(&format!("{}:{}", s.user, s.password))
    );
    let place = |rel: &str| {
        let p = tmp.path().join("places").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &auth).unwrap();
        p
    };
    let authfile = place("explicit/auth.json");
    assert_eq!(
        r.ok(&[
            "ls",
            "-R",
            &url,
            "--cert-dir",
            certs,
            "--authfile",
            authfile.to_str().unwrap()
        ]),
        want
    );
    // (variable, its value, where the file goes under it); HOME is an empty dir otherwise.
    let empty_home = tmp.path().join("empty-home");
    let places = tmp.path().join("places");
    for (var, rel) in [
        ("REGISTRY_AUTH_FILE", "env/auth.json"),
        ("XDG_RUNTIME_DIR", "run/containers/auth.json"),
        ("HOME", "home/.config/containers/auth.json"),
        ("DOCKER_CONFIG", "docker/config.json"),
        ("HOME", "dockerhome/.docker/config.json"),
    ] {
        let file = place(rel);
        let top = rel.split('/').next().unwrap();
        let value = if var == "REGISTRY_AUTH_FILE" {
            file
        } else {
            places.join(top)
        };
        let home = if var == "HOME" {
            value.clone()
        } else {
            empty_home.clone()
        };
        let out = r.run_env(
            &["ls", "-R", &url, "--cert-dir", certs],
            &[("HOME", home.as_os_str()), (var, value.as_os_str())],
        );
        assert_success(&out);
        assert_eq!(out.stdout, want, "{var}={}", value.display());
    }
    // ~/.docker/config.json with a credential helper.
    let dhome = tmp.path().join("dhome");
    std::fs::create_dir_all(dhome.join(".docker")).unwrap();
    std::fs::write(
        dhome.join(".docker/config.json"),
        format!(r#"{{"auths": {{}}, "credHelpers": {{"{host}": "flatfstest"}}}}"#),
    )
    .unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-flatfstest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = {host} ] || exit 1\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"{}\",\"Secret\":\"{}\"}}'\n",
            s.user, s.password
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&helper).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = r.run_env(
        &["ls", "-R", &url, "--cert-dir", certs],
        &[
            ("HOME", dhome.as_os_str()),
            ("PATH", std::ffi::OsStr::new(&path)),
        ],
    );
    assert_success(&out);
    assert_eq!(out.stdout, want, "credHelpers");
    // The same helper as the default store for every host (`credsStore`).
    std::fs::write(
        dhome.join(".docker/config.json"),
        r#"{"auths": {}, "credsStore": "flatfstest"}"#,
    )
    .unwrap();
    let out = r.run_env(
        &["ls", "-R", &url, "--cert-dir", certs],
        &[
            ("HOME", dhome.as_os_str()),
            ("PATH", std::ffi::OsStr::new(&path)),
        ],
    );
    assert_success(&out);
    assert_eq!(out.stdout, want, "credsStore");

    // The password never shows in the most verbose log, not even base64-encoded.
    let out = r.run(&[
        "-vv",
        "ls",
        &url,
        "--cert-dir",
        certs,
        "--creds-file",
        creds,
    ]);
    assert_success(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("GET"), "-vv logs requests:\n{log}");
    for secret in [
        s.password.clone(),
        base64(&format!("{}:{}", s.user, s.password)),
    ] {
        assert!(!log.contains(&secret), "secret in the log:\n{log}");
    }

    // Push with credentials: export to the secured registry.
    r.ok(&[
        "export",
        &url,
        "-o",
        &reg.url("team/flat:1"),
        "--cert-dir",
        certs,
        "--creds-file",
        creds,
    ]);
    assert_eq!(
        r.ok(&[
            "cat",
            &reg.url("team/flat:1"),
            "etc/small.txt",
            "--cert-dir",
            certs,
            "--creds-file",
            creds
        ]),
        b"version 2\n"
    );
}

/// Standard base64, for auth files and Basic headers.
pub fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn registry_bearer_tokens_scopes_refresh_and_redirects_keep_credentials_home() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    // Each token is good for 3 requests: a pull needs several, so tokens are renewed on 401.
    let gw = BearerGateway::start(&reg.host, "writer", "pw-123", 3);
    let r = Runner::new(tmp.path());
    let creds = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let writer = creds("writer", "writer:pw-123\n");
    let reader = creds("reader", "reader:pw-123\n");
    let wrong = creds("wrong", "writer:nope\n");
    let url = gw.url("team/app:1.0");
    let want = r.ok(&["ls", "-R", img.to_str().unwrap()]);

    assert_eq!(
        r.ok(&[
            "ls",
            "-R",
            &url,
            "--tls-verify=false",
            "--creds-file",
            &writer
        ]),
        want
    );
    let basic = format!("Basic {}", base64("writer:pw-123"));
    let tokens = gw.token_seen.lock().unwrap().clone();
    assert!(tokens.len() > 1, "tokens were renewed: {tokens:#?}");
    assert!(
        tokens
            .iter()
            .all(|s| s.header("authorization") == Some(basic.as_str()))
    );
    assert!(tokens.iter().all(|s| s.path.contains("service=flatfs-test")
        && s.path.contains("scope=repository:team/app:pull")));
    let gateway = gw.gateway_seen.lock().unwrap().clone();
    // No /v2/ ping: the manifest's own 401 started the token flow.
    assert!(gateway.iter().all(|s| s.path != "/v2/"), "{gateway:#?}");
    assert!(
        gateway.iter().all(|s| s
            .header("authorization")
            .is_none_or(|a| a.starts_with("Bearer "))),
        "the registry only ever gets tokens"
    );
    let storage = gw.storage_seen.lock().unwrap().clone();
    assert!(!storage.is_empty(), "blobs came through the redirect");
    assert!(
        storage.iter().all(|s| s.header("authorization").is_none()),
        "credentials went to the storage host: {storage:#?}"
    );

    // Wrong password, no credentials: the token server's 401, said as such.
    let err = r.fails(&["ls", &url, "--tls-verify=false", "--creds-file", &wrong]);
    assert!(
        err.contains("token for repository:team/app:pull: 401"),
        "{err}"
    );
    let err = r.fails(&["ls", &url, "--tls-verify=false"]);
    assert!(
        err.contains("401") && err.contains("no credentials found"),
        "{err}"
    );

    // A reader may pull but not push: a missing scope is a clear error, and no tag appears.
    assert_eq!(
        r.ok(&[
            "ls",
            "-R",
            &url,
            "--tls-verify=false",
            "--creds-file",
            &reader
        ]),
        want
    );
    let err = r.fails(&[
        "export",
        &url,
        "-o",
        &gw.url("team/flat:1"),
        "--tls-verify=false",
        "--creds-file",
        &reader,
    ]);
    assert!(
        err.contains(&format!("registry {}", gw.host)) && err.contains("401"),
        "{err}"
    );
    assert!(reg.tags("team/flat").is_empty());
    // The writer may.
    r.ok(&[
        "export",
        &url,
        "-o",
        &gw.url("team/flat:1"),
        "--tls-verify=false",
        "--creds-file",
        &writer,
    ]);
    assert_eq!(reg.tags("team/flat"), vec!["1"]);
    let tokens = gw.token_seen.lock().unwrap().clone();
    assert!(
        tokens
            .iter()
            .any(|s| s.path.contains("scope=repository:team/flat:pull,push")
                && s.path.contains("scope=repository:team/app:pull")),
        "a push from another repository asks for both scopes (for the mount): {tokens:#?}"
    );
}

#[test]
fn registry_all_platforms_export_writes_and_pushes_an_index_of_flattened_images() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_multi(&reg, tmp.path(), "multi", "1");
    let r = Runner::new(tmp.path());
    let src = reg.url("multi:1");
    let archive = tmp.path().join("flat.oci.tar");
    let layout = tmp.path().join("flat-layout");
    let outs = [
        reg.url("multi:flat"),
        archive.to_str().unwrap().to_string(),
        layout.to_str().unwrap().to_string(),
    ];
    r.ok(&[
        "export",
        "--all-platforms",
        &src,
        "-o",
        &outs[0],
        "--tls-verify=false",
    ]);
    r.ok(&[
        "export",
        "--all-platforms",
        &src,
        "-o",
        &outs[1],
        "--tls-verify=false",
    ]);
    r.ok(&[
        "export",
        "--all-platforms",
        &src,
        "-o",
        &outs[2],
        "--format",
        "oci",
        "--tls-verify=false",
    ]);
    for out in &outs {
        for arch in ["amd64", "arm64"] {
            let platform = format!("linux/{arch}");
            let got = r.ok(&[
                "cat",
                out,
                "which",
                "--platform",
                &platform,
                "--tls-verify=false",
            ]);
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("{arch}\n"),
                "{out} {arch}"
            );
            let info: Value = serde_json::from_slice(&r.ok(&[
                "inspect",
                "--json",
                out,
                "--platform",
                &platform,
                "--tls-verify=false",
            ]))
            .unwrap();
            assert_eq!(info["platform"], platform.as_str(), "{out}");
        }
    }
    // skopeo reads the pushed index and both images.
    let copy = tmp.path().join("copy");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "-q", "--all", "--src-tls-verify=false"])
        .arg(&outs[0])
        .arg(format!("oci:{}:latest", copy.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A single image is not an index.
    let img = image(tmp.path());
    let err = r.fails(&[
        "export",
        "--all-platforms",
        img.to_str().unwrap(),
        "-o",
        "x.tar",
    ]);
    assert!(err.contains("not an index"), "{err}");
}

#[test]
fn registry_stalled_download_resumes_and_lost_upload_answer_is_checked() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, big) = big_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "big:1");
    let proxy = FaultProxy::start(&reg.host);
    // The connection goes silent after 100000 bytes: the read times out (1 s here), and the
    // download resumes from there.
    proxy.inject(Fault::Stall {
        path: format!("/blobs/{big}"),
        after: 100_000,
        secs: 5,
        times: 1,
    });
    let r = Runner::new(tmp.path());
    let started = std::time::Instant::now();
    let out = r.run_env(
        &["ls", "-R", &proxy.url("big:1"), "--tls-verify=false"],
        &[("FLATFS_REGISTRY_TIMEOUT", std::ffi::OsStr::new("1"))],
    );
    assert_success(&out);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "did not wait out the stall"
    );
    assert_eq!(out.stdout, r.ok(&["ls", "-R", img.to_str().unwrap()]));
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.header("range") == Some("bytes=100000-")),
        "resumed with a range"
    );

    // A blob PUT that the registry completes but whose answer is lost: the push checks with
    // HEAD and goes on instead of failing or uploading again into a finished session.
    proxy.inject(Fault::Lose {
        path: "digest=sha256".into(),
        times: 1,
    });
    r.ok(&[
        "export",
        img.to_str().unwrap(),
        "-o",
        &proxy.url("flat:1"),
        "--tls-verify=false",
    ]);
    assert_eq!(reg.tags("flat"), vec!["1"]);
}

#[test]
fn registry_push_falls_back_to_a_chunked_upload_when_a_monolithic_put_is_refused() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    let proxy = FaultProxy::start(&reg.host);
    // The first blob PUT with its bytes is refused as a registry without monolithic uploads
    // would; the next ones (the closing PUT of the chunked form among them) go through.
    proxy.inject(Fault::Status {
        path: "digest=sha256".into(),
        status: 405,
        retry_after: None,
        times: 1,
    });
    let r = Runner::new(tmp.path());
    r.ok(&[
        "export",
        img.to_str().unwrap(),
        "-o",
        &proxy.url("chunked:1"),
        "--tls-verify=false",
    ]);
    assert!(
        proxy.seen().iter().any(|s| s.method == "PATCH"),
        "a PATCH upload: {:#?}",
        proxy.seen()
    );
    assert_eq!(
        r.ok(&[
            "cat",
            &reg.url("chunked:1"),
            "etc/small.txt",
            "--tls-verify=false"
        ]),
        b"version 2\n"
    );
}

#[test]
fn registry_image_mounts_and_reads_without_a_cache() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let url = reg.url("team/app:1.0");
    let r = Runner::new(tmp.path());
    // --no-cache: a temp blob store, gone when the command ends.
    assert_eq!(
        r.ok(&["ls", "-R", "--no-cache", &url, "--tls-verify=false"]),
        r.ok(&["ls", "-R", img.to_str().unwrap()])
    );
    assert!(
        !r.cache.join("blobs/sha256").exists(),
        "--no-cache wrote the store"
    );
    if !fuse_available("registry_image_mounts_and_reads_without_a_cache") {
        return;
    }
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    r.ok(&[
        "mount",
        "--no-cache",
        &url,
        mnt.to_str().unwrap(),
        "--tls-verify=false",
    ]);
    let small = std::fs::read(mnt.join("etc/small.txt"));
    let link = std::fs::read(mnt.join("data/target.txt"));
    r.ok(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(small.unwrap(), b"version 2\n");
    assert_eq!(link.unwrap(), b"through the link\n");
}

/// `export docker://… --keep 1 -o docker://…`: the base layer is pushed as the very blob the
/// source has (so the registry already holds it), and the result lists as the source does.
#[test]
fn registry_keep_export_pushes_the_base_blob_unchanged() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let r = Runner::new(tmp.path());
    let out = r.run(&[
        "export",
        &reg.url("team/app:1.0"),
        "--keep",
        "1",
        "-o",
        &reg.url("team/kept:1"),
        "--tls-verify=false",
    ]);
    assert_success(&out);
    assert_eq!(reg.tags("team/kept"), vec!["1"]);
    let inspect = |name: &str| -> Value {
        serde_json::from_slice(&r.ok(&["inspect", "--json", &reg.url(name), "--tls-verify=false"]))
            .unwrap()
    };
    let (src, kept) = (inspect("team/app:1.0"), inspect("team/kept:1"));
    let layers = |v: &Value| v["layers"].as_array().unwrap().clone();
    assert_eq!(layers(&kept).len(), 2, "{kept:#}");
    assert_eq!(
        layers(&kept)[0]["digest"],
        layers(&src)[0]["digest"],
        "the kept base layer is the source's blob"
    );
    let listing = |name: &str| r.ok(&["ls", "-lR", &reg.url(name), "--tls-verify=false"]);
    assert_eq!(
        String::from_utf8_lossy(&listing("team/kept:1")),
        String::from_utf8_lossy(&listing("team/app:1.0")),
        "the pushed image merges to the source's tree"
    );
}

/// The real busybox `hello` image of make-images.sh, flattened from one registry repository
/// to another by `export docker://… -o docker://…`: podman pulls the pushed image and runs it.
#[test]
#[ignore = "needs root, podman and ../shared/tools: scripts/test.sh runs it with the oracle tests"]
fn registry_pushed_flat_image_is_pulled_and_run_by_podman() {
    use crate::squash::{podman_setup, run_tool};
    registry_tools(&["podman"]);
    let tmp = tempfile::tempdir().unwrap();
    let (tools, env) = podman_setup(tmp.path());
    let images = tmp.path().join("images");
    run_tool(
        std::process::Command::new(tools.join("make-images.sh"))
            .arg(&images)
            .arg("hello"),
    );
    let reg = Registry::start();
    reg.push(
        &format!("oci:{}:latest", images.join("hello").display()),
        "demo/hello:1",
    );
    let r = Runner::new(tmp.path());
    r.ok(&[
        "export",
        &reg.url("demo/hello:1"),
        "-o",
        &reg.url("demo/hello-flat:1"),
        "--tls-verify=false",
    ]);
    let podman = || {
        let mut c = std::process::Command::new("podman");
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    };
    let name = format!("{}/demo/hello-flat:1", reg.host);
    run_tool(podman().args(["pull", "-q", "--tls-verify=false", &name]));
    let said = run_tool(podman().args(["run", "--rm", "--pull", "never", &name]));
    let _ = podman().args(["rmi", "-f", &name]).output();
    assert_eq!(
        said.trim(),
        "Hello, World!",
        "podman run of the pushed image"
    );
}

/// Lazy mounts (issue 14): an image whose first layer is 12 MiB that does not compress, with
/// a small file after it; returns the layout, the noise, and that layer's digest and size.
pub(crate) fn lazy_image(at: &Path) -> (PathBuf, Vec<u8>, String, u64) {
    let noise = noise(0x2545_f491_4f6c_dd1d, 12 << 20);
    let layers = vec![
        layer([
            dir("data"),
            file("data/noise.bin", noise.clone()),
            file("data/tail.txt", b"the end of the big layer\n"),
        ])
        .compression(Compression::Gzip),
        layer([file("data/top.txt", b"top\n")]).compression(Compression::Gzip),
    ];
    let path = at.join("lazy");
    let written = write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    let digest = written.layer_digests[0].clone();
    let size = std::fs::metadata(path.join("blobs/sha256").join(&digest[7..]))
        .unwrap()
        .len();
    (path, noise, digest, size)
}

/// Blob bytes the proxy was asked for, by ranged GETs of `digest` from request `from` on, and
/// how many requests; a GET without a range would be the whole blob, so it fails the test.
pub(crate) fn ranged_bytes(proxy: &FaultProxy, digest: &str, from: usize) -> (u64, usize) {
    let gets: Vec<Seen> = proxy.seen()[from..]
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{digest}")))
        .cloned()
        .collect();
    let bytes = gets
        .iter()
        .map(|s| {
            let range = s.header("range").expect("every blob GET is ranged");
            let (a, b) = range
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .expect("a single range");
            b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
        })
        .sum();
    (bytes, gets.len())
}

#[test]
fn registry_lazy_mount_fetches_only_what_is_read_and_checks_every_span() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let (img, noise, big, size) = lazy_image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "lazy:1");
    let r = Runner::new(tmp.path());
    // An earlier command indexed the image on this host; its blobs are gone since.
    r.ok(&["ls", "-R", &reg.url("lazy:1"), "--tls-verify=false"]);
    std::fs::remove_dir_all(r.cache.join("blobs")).unwrap();
    if !fuse_available("registry_lazy_mount_fetches_only_what_is_read_and_checks_every_span") {
        return;
    }
    let proxy = FaultProxy::start(&reg.host);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    r.ok(&[
        "mount",
        &proxy.url("lazy:1"),
        mnt.to_str().unwrap(),
        "--tls-verify=false",
    ]);
    let at_mount = ranged_bytes(&proxy, &big, 0);
    // The mount table names the reference as given, not as a path under the current directory.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.contains(&format!("flatfs:{} ", proxy.url("lazy:1"))),
        "{mounts}"
    );
    let tail = std::fs::read(mnt.join("data/tail.txt"));
    let top = std::fs::read(mnt.join("data/top.txt"));
    let after_read = ranged_bytes(&proxy, &big, 0);
    // The same file again: local (the kernel's page cache aside, flatfs's span file).
    let again = std::fs::read(mnt.join("data/tail.txt"));
    let seen_before_tamper = proxy.seen().len();

    // A registry that lies about bytes not fetched yet: EIO, never the wrong bytes; right
    // again once it behaves.
    let read_middle = || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(mnt.join("data/noise.bin"))?;
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 6 << 20)?;
        Ok::<_, std::io::Error>(buf)
    };
    proxy.inject(Fault::Corrupt {
        path: format!("/blobs/{big}"),
        times: 1000,
    });
    let tampered = read_middle();
    proxy.clear_faults();
    let honest = read_middle();
    r.ok(&["umount", mnt.to_str().unwrap()]);

    // A registry that ignores Range: the answer is read only as far as needed.
    proxy.inject(Fault::IgnoreRange {
        path: format!("/blobs/{big}"),
        times: 1000,
    });
    // In the foreground with -v, which logs what each lazy layer fetched at unmount.
    let server = flatfs()
        .env("FLATFS_CACHE_DIR", &r.cache)
        .env("HOME", &r.cache)
        .args(["mount", "-f", "-v", &proxy.url("lazy:1")])
        .arg(&mnt)
        .arg("--tls-verify=false")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn flatfs mount -f");
    let start = std::time::Instant::now();
    while !mnt.join("data").exists() && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let tail_whole = std::fs::read(mnt.join("data/tail.txt"));
    r.ok(&["umount", mnt.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&server.wait_with_output().unwrap().stderr).into_owned();

    eprintln!(
        "lazy mount: {} bytes in {} requests at mount, {} bytes in {} requests after reading \
         data/tail.txt, of a {size}-byte layer blob",
        at_mount.0, at_mount.1, after_read.0, after_read.1
    );
    assert_eq!(tail.unwrap(), b"the end of the big layer\n");
    assert_eq!(top.unwrap(), b"top\n");
    assert_eq!(again.unwrap(), b"the end of the big layer\n");
    // Opening fetches nothing: the index is cached, the manifest says the compression.
    assert_eq!(at_mount, (0, 0));
    assert!(
        after_read.0 * 4 < size,
        "fetched {} of {size} bytes",
        after_read.0
    );
    assert_eq!(
        ranged_bytes(&proxy, &big, 0).1,
        after_read.1 + ranged_bytes(&proxy, &big, seen_before_tamper).1,
        "a re-read fetched again"
    );
    // Noise deflates to stored blocks: a flipped byte inflates fine, only the span digest
    // catches it.
    let Err(err) = tampered else {
        panic!("tampered bytes were read");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(honest.unwrap(), noise[6 << 20..(6 << 20) + 4096]);
    assert_eq!(tail_whole.unwrap(), b"the end of the big layer\n");
    assert!(
        log.contains(&format!("lazy@{big}: fetched ")) && log.contains(" range requests"),
        "{log}"
    );
    assert!(
        !r.cache.join("blobs/sha256").join(&big[7..]).exists(),
        "a lazy mount stored the blob"
    );
}

/// An index that names one nested index twice (as an index merged from two lists may): each
/// nested index is fetched and linked into the layout once, and the image opens.
#[test]
fn registry_index_naming_a_nested_index_twice_opens() {
    registry_tools(&[]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut oci = OciLayout::new();
    let arm = vec![layer([file("which", b"arm64\n")])];
    let mut arm_config = default_config(&arm);
    arm_config["architecture"] = "arm64".into();
    let (arm_desc, _) = oci.add_image(&arm, &arm_config);
    let nested = oci.add_index(vec![with_platform(
        arm_desc.clone(),
        "linux",
        "arm64",
        None,
    )]);
    let top = oci.add_index(vec![nested.clone(), nested.clone()]);
    let layout = tmp.path().join("dup");
    oci.write_dir(&layout);
    let blob_dir = layout.join("blobs/sha256");
    let bytes_of = |desc: &Value| {
        let digest = desc["digest"].as_str().unwrap();
        std::fs::read(blob_dir.join(digest.trim_start_matches("sha256:"))).unwrap()
    };
    let docs: Vec<(String, String, Vec<u8>)> = [(&arm_desc, false), (&nested, false), (&top, true)]
        .iter()
        .map(|(d, tagged)| {
            let reference = if *tagged {
                "1"
            } else {
                d["digest"].as_str().unwrap()
            };
            (
                reference.to_string(),
                d["mediaType"].as_str().unwrap().to_string(),
                bytes_of(d),
            )
        })
        .collect();
    let blobs: Vec<Vec<u8>> = std::fs::read_dir(&blob_dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            ![&arm_desc, &nested, &top]
                .iter()
                .any(|d| d["digest"].as_str().unwrap().ends_with(&name))
        })
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    reg.put_raw("dup", &blobs, &docs);
    let r = Runner::new(tmp.path());
    let out = r.ok(&[
        "cat",
        &reg.url("dup:1"),
        "which",
        "--platform",
        "linux/arm64",
        "--tls-verify=false",
    ]);
    assert_eq!(String::from_utf8_lossy(&out), "arm64\n");
}

/// The URLs a run asked for (its debug log's request lines).
fn requested(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once("] ").map_or(l, |(_, r)| r).split_once(' '))
        .filter(|(m, u)| matches!(*m, "GET" | "HEAD") && u.contains("://"))
        .map(|(m, u)| format!("{m} {}", u.split(' ').next().unwrap_or(u)))
        .collect()
}

#[test]
fn registry_no_ping_and_plain_http_is_remembered_only_where_tls_is_not_required() {
    registry_tools(&["htpasswd", "openssl"]);
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    reg.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let proxy = FaultProxy::start(&reg.host);
    let r = Runner::new(tmp.path());
    let want = r.ok(&["ls", "-R", img.to_str().unwrap()]);
    let debug = [("RUST_LOG", std::ffi::OsStr::new("flatfs=debug"))];
    let url = proxy.url("team/app:1.0");
    let ls = |r: &Runner| {
        let out = r.run_env(&["ls", "-R", &url, "--tls-verify=false"], &debug);
        assert_success(&out);
        assert_eq!(out.stdout, want);
        requested(&out)
    };
    let memory = r.cache.join(format!("registries/{}.http", proxy.host));

    // First run: HTTPS fails, plain HTTP answers and is remembered; no /v2/ ping.
    let first = ls(&r);
    let manifest = format!("GET https://{}/v2/team/app/manifests/1.0", proxy.host);
    assert_eq!(first.first(), Some(&manifest), "{first:#?}");
    assert_eq!(first[1], manifest.replace("https", "http"), "{first:#?}");
    assert!(memory.is_file(), "plain HTTP remembered");
    let pings = |seen: &[Seen]| seen.iter().filter(|s| s.path == "/v2/").count();
    assert_eq!(pings(&proxy.seen()), 0);
    // Second run: straight to plain HTTP, no HTTPS attempt, no ping.
    let second = ls(&r);
    assert!(
        second.iter().all(|u| u.contains("GET http://")),
        "{second:#?}"
    );
    assert_eq!(second.first(), first.get(1));
    assert_eq!(pings(&proxy.seen()), 0);
    // TLS required: the memory is not used; the handshake fails as before (the registry
    // itself: the proxy drops a TLS hello, a retried dropped connection).
    let direct = r.cache.join(format!("registries/{}.http", reg.host));
    std::fs::write(&direct, b"").unwrap();
    let err = r.fails(&["ls", &reg.url("team/app:1.0")]);
    assert!(
        err.contains("TLS") && err.contains("--tls-verify=false"),
        "{err}"
    );
    assert!(memory.is_file() && direct.is_file());

    // Nobody listening, with plain HTTP remembered: both schemes tried, a clear error, and
    // the memory kept (the registry may come back as it was).
    let port = free_port();
    let gone = r.cache.join(format!("registries/127.0.0.1:{port}.http"));
    std::fs::write(&gone, b"").unwrap();
    let out = r.run_env(
        &[
            "ls",
            &format!("docker://127.0.0.1:{port}/a:1"),
            "--tls-verify=false",
        ],
        &debug,
    );
    assert!(!out.status.success());
    let asked = requested(&out);
    assert_eq!(asked.len(), 2, "{asked:#?}");
    assert!(asked[0].starts_with("GET http://") && asked[1].starts_with("GET https://"));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "registry 127.0.0.1:{port}: GET manifest a:1: cannot connect"
        )),
        "{err}"
    );
    assert!(gone.is_file());

    // A host remembered as plain HTTP that now speaks only HTTPS (with basic auth): its
    // bare 400 to plain HTTP sends the client to HTTPS, where the 401 challenge starts the
    // login; the memory is dropped.
    let sec = Registry::start_secured();
    sec.push(&format!("oci:{}:latest", img.display()), "team/app:1.0");
    let s = sec.secured.as_ref().unwrap();
    let creds = tmp.path().join("creds");
    std::fs::write(&creds, format!("{}:{}\n", s.user, s.password)).unwrap();
    let moved = r.cache.join(format!("registries/{}.http", sec.host));
    std::fs::write(&moved, b"").unwrap();
    let out = r.run_env(
        &[
            "ls",
            "-R",
            &sec.url("team/app:1.0"),
            "--tls-verify=false",
            "--creds-file",
            creds.to_str().unwrap(),
        ],
        &debug,
    );
    assert_success(&out);
    assert_eq!(out.stdout, want);
    let asked = requested(&out);
    assert!(asked[0].starts_with("GET http://"), "{asked:#?}");
    assert!(
        asked[1..].iter().all(|u| u.starts_with("GET https://")),
        "{asked:#?}"
    );
    assert!(!moved.exists(), "plain HTTP forgotten");
}
