//! What a user meets at the command line: messages, refusals, summaries, help and man pages.
//! See: issue 11 ("What a new user trips over").

use crate::util::*;

fn two_layers() -> Vec<Layer> {
    vec![
        layer([dir("etc"), file("etc/a", "a")]),
        layer([file("etc/b", "b")]),
    ]
}

/// The layout `skopeo copy --all` and buildx write: index.json points at one nested index
/// (no platform on its descriptor) that holds the per-platform manifests.
#[test]
fn platform_error_for_a_nested_index_lists_the_nested_platforms() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let mut oci = OciLayout::new();
    let (arm, _) = oci.add_image(&layers, &default_config(&layers));
    let mut s390_config = default_config(&layers);
    s390_config["architecture"] = "s390x".into();
    let (s390, _) = oci.add_image(&layers, &s390_config);
    let nested = oci.add_index(vec![
        with_platform(arm, "linux", "arm64", Some("v8")),
        with_platform(s390, "linux", "s390x", None),
    ]);
    oci.add_index_entry(with_annotations(
        nested,
        &[("org.opencontainers.image.ref.name", "latest")],
    ));
    let dir = tmp.path().join("multi");
    oci.write_dir(&dir);
    let stderr = assert_error(&run_flatfs([
        "ls".as_ref(),
        dir.as_os_str(),
        "--platform".as_ref(),
        "linux/riscv64".as_ref(),
    ]));
    assert!(
        stderr.contains("available: linux/arm64/v8, linux/s390x)"),
        "the nested index's platforms should be listed:\n{stderr}"
    );
    assert!(!stderr.contains("unspecified"), "{stderr}");
    // And one of them can be picked.
    assert_success(&run_flatfs([
        "ls".as_ref(),
        dir.as_os_str(),
        "--platform".as_ref(),
        "linux/s390x".as_ref(),
    ]));
}

fn ok(args: &[&std::ffi::OsStr]) -> String {
    let out = run_flatfs(args);
    assert_success(&out);
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Layer 1: `bin/hello` and a symlink `usr/bin -> ../bin`; layer 2 hardlinks `bin/hi` to it.
fn hardlink_image(dir: &std::path::Path) -> std::path::PathBuf {
    let layers = vec![
        layer([
            self::dir("bin"),
            file("bin/hello", "#!/bin/sh\n").mode(0o755),
            self::dir("usr"),
            symlink("usr/bin", "../bin"),
        ]),
        layer([hardlink("bin/hi", "bin/hello"), file("note", "n")]),
    ];
    let path = dir.join("img");
    write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    path
}

/// "The layer an entry comes from" is the layer that added the name: for a hardlink added by
/// a later layer, that layer, in `ls --layer`, `diff` and `inspect` alike.
#[test]
fn ls_layer_diff_and_inspect_agree_on_a_hardlink_added_later() {
    let tmp = tempfile::tempdir().unwrap();
    let img = hardlink_image(tmp.path());
    let img = img.as_os_str();
    let ls = ok(&["ls".as_ref(), img, "-R".as_ref(), "--layer".as_ref()]);
    let layer_of = |listing: &str, path: &str| -> String {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(path))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {path} in:\n{listing}"))
            .to_string()
    };
    assert_eq!(layer_of(&ls, "bin/hi"), "2", "{ls}");
    assert_eq!(layer_of(&ls, "bin/hello"), "1", "{ls}");
    // Reached through the symlink, listed as a directory, or named alone: the same answer.
    let through = ok(&["ls".as_ref(), img, "--layer".as_ref(), "/usr/bin/".as_ref()]);
    assert_eq!(layer_of(&through, "hi"), "2", "{through}");
    let alone = ok(&[
        "ls".as_ref(),
        img,
        "--layer".as_ref(),
        "usr/bin/hi".as_ref(),
    ]);
    assert_eq!(alone.trim(), "2 usr/bin/hi");

    let diff = ok(&["diff".as_ref(), img, "2".as_ref()]);
    assert!(
        diff.lines()
            .any(|l| l.starts_with('+') && l.ends_with(" bin/hi")),
        "diff 2 adds bin/hi:\n{diff}"
    );
    let inspect = run_flatfs(["inspect".as_ref(), img, "--json".as_ref()]);
    assert_success(&inspect);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        v["layers"][1]["added"], 2,
        "layer 2 adds bin/hi and note: {v}"
    );
}

#[test]
fn ls_shows_a_symlink_operand_with_l_unless_it_ends_in_a_slash() {
    let tmp = tempfile::tempdir().unwrap();
    let img = hardlink_image(tmp.path());
    let img = img.as_os_str();
    let link = ok(&["ls".as_ref(), img, "-l".as_ref(), "/usr/bin".as_ref()]);
    assert_eq!(link.lines().count(), 1, "{link}");
    assert!(
        link.starts_with('l') && link.trim_end().ends_with("/usr/bin -> ../bin"),
        "{link}"
    );
    let dir = ok(&["ls".as_ref(), img, "-l".as_ref(), "/usr/bin/".as_ref()]);
    let names: Vec<&str> = dir
        .lines()
        .filter_map(|l| l.split(' ').next_back())
        .collect();
    assert_eq!(names, ["hello", "hi"], "{dir}");
    // Without -l, ls lists what the link points at.
    assert_eq!(
        ok(&["ls".as_ref(), img, "/usr/bin".as_ref()]),
        "hello\nhi\n"
    );
}

#[test]
fn ls_prints_a_file_operand_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    let img = hardlink_image(tmp.path());
    let img = img.as_os_str();
    assert_eq!(
        ok(&["ls".as_ref(), img, "/bin/hello".as_ref()]),
        "/bin/hello\n"
    );
    assert_eq!(
        ok(&["ls".as_ref(), img, "bin/hello".as_ref()]),
        "bin/hello\n"
    );
}

#[test]
fn diff_usage_and_range_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let img = hardlink_image(tmp.path());
    let img = img.to_str().unwrap();
    // --from without --to: a usage error that asks for --to, and no required <LAYER> in sight.
    let out = run_flatfs(["diff", img, "--from", "1"]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--to <M>"), "{stderr}");
    assert!(
        stderr.contains("--from <N> --to <M>"),
        "usage shows both forms:\n{stderr}"
    );
    // Layer 0 is not a layer.
    let out = run_flatfs(["diff", img, "0"]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("numbered from 1"), "{stderr}");
    // Out of range: in words, not Rust ranges.
    for args in [
        vec!["diff", img, "3"],
        vec!["diff", img, "--from", "0", "--to", "5"],
    ] {
        let stderr = assert_error(&run_flatfs(&args));
        assert!(stderr.contains("has 2 layers"), "{stderr}");
        assert!(!stderr.contains(".."), "{stderr}");
    }
    assert_success(&run_flatfs(["diff", img, "--from", "0", "--to", "2"]));
}

/// -q, -v and --no-cache are listed where they do something, and taken before the command.
#[test]
fn global_options_only_where_they_apply() {
    let help = |cmd: &[&str]| {
        let out = run_flatfs(cmd.iter().chain(&["--help"]));
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    for cmd in [&["completions"][..], &["man"], &["umount"]] {
        let h = help(cmd);
        for opt in ["--quiet", "--verbose", "--no-cache"] {
            assert!(!h.contains(opt), "{cmd:?} --help lists {opt}:\n{h}");
        }
    }
    for cmd in ["export", "mount", "inspect", "ls", "cat", "diff"] {
        let h = help(&[cmd]);
        for opt in ["--quiet", "--verbose", "--no-cache"] {
            assert!(h.contains(opt), "{cmd} --help should list {opt}:\n{h}");
        }
    }
    let cache = help(&["cache"]);
    assert!(
        cache.contains("--quiet") && !cache.contains("--no-cache"),
        "{cache}"
    );
    let ls = help(&["ls"]);
    assert_eq!(ls.matches("[default: /]").count(), 1, "{ls}");

    let tmp = tempfile::tempdir().unwrap();
    let img = hardlink_image(tmp.path());
    let img = img.to_str().unwrap();
    let before = run_flatfs(["-q", "--no-cache", "ls", img]);
    let after = run_flatfs(["ls", "-q", "--no-cache", img]);
    assert_success(&before);
    assert_eq!(before.stdout, after.stdout);
}

/// Runs `flatfs ARGS` under a pseudo-terminal `cols` wide (util-linux `script`); returns
/// what the terminal showed, one string per line as drawn (`\r` starts a redraw).
fn on_a_terminal(cols: u16, args: &str) -> Vec<String> {
    let cmd = format!(
        "stty rows 24 cols {cols}; FLATFS_CACHE_DIR=/nonexistent/x {} {args}",
        env!("CARGO_BIN_EXE_flatfs")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}");
    // Drop the escape sequences indicatif moves the cursor with.
    let mut plain = String::new();
    let mut chars = shown.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn progress_line_fits_the_terminal_and_tiny_images_get_none() {
    let tmp = tempfile::tempdir().unwrap();
    let big_layers = vec![layer([file("big", noise(1, 8 << 20))])];
    let big = tmp.path().join("big.docker.tar");
    write_docker_archive(&big_layers, &default_config(&big_layers), &big);
    let out = tmp.path().join("out.tar");
    for cols in [80, 50] {
        let lines = on_a_terminal(
            cols,
            &format!("export --no-cache {} -o {}", big.display(), out.display()),
        );
        let bars: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("exporting") || l.contains("indexing"))
            .collect();
        assert!(
            !bars.is_empty(),
            "no progress line at {cols} columns: {lines:?}"
        );
        for l in bars {
            assert!(
                l.chars().count() <= cols as usize,
                "{} columns on a {cols}-column terminal: {l:?}",
                l.chars().count()
            );
        }
    }
    let small_layers = two_layers();
    let small = tmp.path().join("small.docker.tar");
    write_docker_archive(&small_layers, &default_config(&small_layers), &small);
    let lines = on_a_terminal(
        80,
        &format!("export --no-cache {} -o {}", small.display(), out.display()),
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("exporting") || l.contains("indexing")),
        "a bar for a tiny image: {lines:?}"
    );
}

#[test]
fn export_to_a_terminal_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let img = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &img);
    let lines = on_a_terminal(80, &format!("export {} -o -; echo rc=$?", img.display()));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refusing to write an image to a terminal")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "rc=1"), "{lines:?}");
    // --force writes it to the terminal anyway.
    let lines = on_a_terminal(
        80,
        &format!(
            "export {} -o - --force --format rootfs; echo rc=$?",
            img.display()
        ),
    );
    assert!(lines.iter().any(|l| l == "rc=0"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("etc/a")),
        "the tar on screen: {lines:?}"
    );
}

/// The summary names the layer count in words, and labels the image ID and manifest digest;
/// podman, loading the output, reports the same image ID.
#[test]
fn export_summary_labels_image_id_and_manifest_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![layer([file("a", "a")])];
    let img = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &img);
    let label = |stderr: &str, what: &str| -> Option<String> {
        stderr
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(what))
            .map(|v| v.trim().to_string())
    };
    for format in ["docker-archive", "oci-archive"] {
        let out = tmp.path().join(format!("out.{format}.tar"));
        let res = run_flatfs([
            "export".as_ref(),
            img.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--format".as_ref(),
            format.as_ref(),
        ]);
        assert_success(&res);
        let stderr = stderr_of(&res);
        assert!(stderr.contains("flattened 1 layer ("), "{stderr}");
        let id = label(&stderr, "image ID").expect("image ID line");
        let manifest = label(&stderr, "manifest");
        assert_eq!(manifest.is_some(), format == "oci-archive", "{stderr}");
        let podman = std::process::Command::new("podman")
            .arg("--root")
            .arg(tmp.path().join("root"))
            .arg("--runroot")
            .arg(tmp.path().join("run"))
            .args(["--storage-driver", "vfs", "load", "-q", "-i"])
            .arg(&out)
            .output()
            .expect("podman (scripts/test.sh installs it)");
        assert!(podman.status.success(), "{}", stderr_of(&podman));
        let images = std::process::Command::new("podman")
            .arg("--root")
            .arg(tmp.path().join("root"))
            .arg("--runroot")
            .arg(tmp.path().join("run"))
            .args(["--storage-driver", "vfs", "images", "-q", "--no-trunc"])
            .output()
            .expect("podman images");
        let ids = String::from_utf8_lossy(&images.stdout);
        assert!(
            ids.lines().any(|l| l.trim() == id),
            "{id} not in podman's {ids}"
        );
    }
}

#[test]
fn inspect_labels_image_id_and_aligns_long_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let mut config = default_config(&layers);
    config["config"]["Labels"] = serde_json::json!({"org.example.team": "storage"});
    config["config"]["Entrypoint"] = serde_json::json!(["/bin/sh", "-c"]);
    config["config"]["WorkingDir"] = serde_json::json!("/srv");
    let docker = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &config, &docker);
    let text = ok(&["inspect".as_ref(), docker.as_os_str()]);
    assert!(
        !text.contains("Manifest:"),
        "a docker archive has no manifest digest:\n{text}"
    );
    // The image ID is the config's digest, which names the config file in the archive.
    let manifest = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&docker)
        .arg("manifest.json")
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    let config_file = manifest[0]["Config"].as_str().unwrap();
    let id_line = text
        .lines()
        .find(|l| l.starts_with("Image ID:"))
        .unwrap_or("");
    assert_eq!(
        id_line.trim_start_matches("Image ID:").trim(),
        format!("sha256:{}", config_file.trim_end_matches(".json")),
        "{text}"
    );
    assert!(
        text.contains("org.example.team=storage"),
        "labels shown:\n{text}"
    );
    // Every "Key: value" line before the table starts its value in one column.
    let header: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).collect();
    let columns: std::collections::BTreeSet<usize> = header
        .iter()
        .map(|l| {
            let colon = l.find(':').unwrap();
            colon + 1 + l[colon + 1..].len() - l[colon + 1..].trim_start().len()
        })
        .collect();
    assert_eq!(
        columns.len(),
        1,
        "values not aligned:\n{}",
        header.join("\n")
    );

    let oci = tmp.path().join("in.oci.tar");
    write_oci_archive(&layers, &config, &oci);
    let text = ok(&["inspect".as_ref(), oci.as_os_str()]);
    assert!(
        text.contains("Manifest:") && text.contains("Image ID:"),
        "{text}"
    );
    let json = run_flatfs(["inspect".as_ref(), oci.as_os_str(), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["config"]["labels"]["org.example.team"], "storage");
}

#[test]
fn man_pages_for_every_command() {
    let top = ok(&["man".as_ref()]);
    let tmp = tempfile::tempdir().unwrap();
    ok(&["man".as_ref(), "--dir".as_ref(), tmp.path().as_os_str()]);
    // Every page the top one refers to exists, and `flatfs man CMD` prints it.
    let mut referred = Vec::new();
    for word in top.split_whitespace() {
        if let Some(name) = word.strip_suffix("(1)") {
            referred.push(name.replace("\\-", "-"));
        }
    }
    assert!(referred.len() >= 9, "{referred:?}");
    for name in &referred {
        let file = tmp.path().join(format!("{name}.1"));
        let page = std::fs::read_to_string(&file)
            .unwrap_or_else(|_| panic!("flatfs(1) refers to {name}(1), not written"));
        let cmd: Vec<&str> = name.split('-').skip(1).collect();
        let mut args = vec!["man"];
        args.extend(&cmd);
        let out = run_flatfs(&args);
        assert_success(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            page,
            "flatfs man {cmd:?}"
        );
        assert!(page.contains(&format!(".TH {name} 1")), "{page}");
    }
    assert!(tmp.path().join("flatfs-cache-ls.1").exists());
    let out = run_flatfs(["man", "nope"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("export"), "lists the commands: {stderr}");
}

/// As GNU cat: a missing path is reported, the others are still printed, the exit status is 1.
#[test]
fn cat_goes_on_past_a_missing_path_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let img = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &img);
    let out = run_flatfs([
        "cat".as_ref(),
        img.as_os_str(),
        "/etc/a".as_ref(),
        "/nope".as_ref(),
        "/etc".as_ref(),
        "/etc/b".as_ref(),
    ]);
    let stderr = assert_error(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ab");
    assert_eq!(
        stderr,
        "flatfs: /nope: no such file or directory\nflatfs: /etc: not a regular file\n"
    );
}

/// A cache directory that cannot be made is said once, and the command still works.
#[test]
fn an_uncreatable_cache_dir_gets_one_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let img = tmp.path().join("in.docker.tar");
    write_docker_archive(&layers, &default_config(&layers), &img);
    // Nothing can be created under a regular file, not even by root.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", blocker.join("cache"))
        .arg("ls")
        .arg(&img)
        .output()
        .unwrap();
    assert_success(&out);
    let stderr = stderr_of(&out);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("flatfs: warning: cannot create the cache directory"),
        "{stderr}"
    );
}

#[test]
fn a_truncated_archive_is_called_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = vec![
        layer([file("big", noise(2, 64 << 10))]),
        layer([file("b", "b")]),
    ];
    let whole = docker_archive_bytes(&layers, &default_config(&layers));
    for cut in [1000, whole.len() / 3, whole.len() / 2] {
        let img = tmp.path().join("cut.tar");
        std::fs::write(&img, &whole[..cut]).unwrap();
        let stderr = assert_error(&run_flatfs(["ls".as_ref(), img.as_os_str()]));
        assert!(
            stderr.contains("truncated"),
            "cut at {cut} of {}: {stderr}",
            whole.len()
        );
    }
}

/// Every example command of README.md runs against the bundled demo images (the script says
/// which it leaves out: those marked "(needs docker)" and the test suite itself).
#[test]
fn readme_examples_run() {
    if !fuse_available("readme_examples_run") {
        return;
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/readme-examples.sh");
    let out = std::process::Command::new(&script)
        .arg(env!("CARGO_BIN_EXE_flatfs"))
        .output()
        .expect("run scripts/readme-examples.sh");
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("readme-examples: ran "), "{stderr}");
}

/// `PATH:REF` picks one image from an archive holding several, and a REF may contain `:`
/// (`podman save -m` writes `localhost/orig:3`); a layout dir takes such a REF too.
#[test]
fn path_ref_picks_an_image_from_a_multi_image_archive_or_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let config = default_config(&layers);
    // A docker archive listing the image twice under two names, as `docker save a b` does.
    let bytes = docker_archive_bytes(&layers, &config);
    let mut rebuilt = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if path.to_str() == Some("manifest.json") {
            let m: serde_json::Value = serde_json::from_slice(&data).unwrap();
            let mut other = m[0].clone();
            other["RepoTags"] = serde_json::json!(["localhost/other:1"]);
            let mut first = m[0].clone();
            first["RepoTags"] = serde_json::json!(["localhost/orig:3"]);
            data = serde_json::to_vec(&serde_json::json!([first, other])).unwrap();
        }
        let mut header = entry.header().clone();
        header.set_size(data.len() as u64);
        header.set_cksum();
        rebuilt.append(&header, data.as_slice()).unwrap();
    }
    let multi = tmp.path().join("multi.tar");
    std::fs::write(&multi, rebuilt.into_inner().unwrap()).unwrap();
    let res = run_flatfs([std::ffi::OsStr::new("inspect"), multi.as_os_str()]);
    assert!(assert_error(&res).contains("localhost/orig:3"));
    let spec = format!("{}:localhost/orig:3", multi.display());
    ok(&["inspect".as_ref(), spec.as_ref()]);

    // An OCI layout dir and an OCI archive whose ref.name holds a `:`.
    let layout = tmp.path().join("layout");
    write_oci_layout(&layers, &config, &layout, Some("localhost/orig:3"));
    let spec = format!("{}:localhost/orig:3", layout.display());
    ok(&["inspect".as_ref(), spec.as_ref()]);
    let oci_tar = tmp.path().join("multi.oci.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&oci_tar).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    drop(b);
    let spec = format!("{}:localhost/orig:3", oci_tar.display());
    ok(&["inspect".as_ref(), spec.as_ref()]);
}

/// Classic `docker save` writes a repeated layer once and makes the other `<id>/layer.tar` a
/// symlink `../<otherid>/layer.tar`: it reads as its target. A link leaving the archive is
/// no layer.
#[test]
fn docker_archive_with_a_symlinked_layer_tar_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let same = || layer([file("same.txt", "twice")]);
    let layers = vec![same(), layer([file("mid.txt", "m")]), same()];
    let config = default_config(&layers);
    let plain = tmp.path().join("plain.tar");
    let written = write_docker_archive(&layers, &config, &plain);
    let build = |target: &str, out: &std::path::Path| {
        let bytes = std::fs::read(&plain).unwrap();
        let mut rebuilt = tar::Builder::new(Vec::new());
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            let mut header = entry.header().clone();
            if path == written.layer_paths[2] {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_link_name(target).unwrap();
                header.set_cksum();
                rebuilt.append(&header, std::io::empty()).unwrap();
            } else {
                rebuilt.append(&header, data.as_slice()).unwrap();
            }
        }
        std::fs::write(out, rebuilt.into_inner().unwrap()).unwrap();
    };
    let first_dir = written.layer_paths[0].split('/').next().unwrap();
    let linked = tmp.path().join("linked.tar");
    build(&format!("../{first_dir}/layer.tar"), &linked);
    let out = ok(&["cat".as_ref(), linked.as_os_str(), "same.txt".as_ref()]);
    assert_eq!(out, "twice");
    ok(&["inspect".as_ref(), linked.as_os_str()]);

    let escaping = tmp.path().join("escaping.tar");
    build(&format!("../../{first_dir}/layer.tar"), &escaping);
    let res = run_flatfs([std::ffi::OsStr::new("inspect"), escaping.as_os_str()]);
    assert!(assert_error(&res).contains("layer.tar"));
}

/// Output into a pipe whose reader is gone exits 141 (as a shell reports SIGPIPE), and into
/// a full disk exits 1 with a message: never a panic (101).
#[test]
fn closed_or_full_stdout_is_an_exit_code_not_a_panic() {
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let image = tmp.path().join("img.tar");
    write_docker_archive(&layers, &default_config(&layers), &image);
    let image = image.to_str().unwrap();
    let commands: [&[&str]; 3] = [
        &["completions", "bash"],
        &["cache", "du"],
        &["inspect", "--json", image],
    ];
    for args in commands {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let out = flatfs()
            .args(args)
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(141),
            "{args:?} into a closed pipe: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");

        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = flatfs()
            .args(args)
            .stdout(Stdio::from(full))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} into /dev/full: {stderr}"
        );
        assert!(stderr.starts_with("flatfs: "), "{args:?}: {stderr}");
    }
}

/// A skopeo `dir:` copy (manifest.json is one image manifest) is named as such, with how
/// to convert it, instead of a JSON type error.
#[test]
fn skopeo_dir_copy_is_named_with_how_to_convert_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("copy");
    std::fs::create_dir(&dir).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": 2, "digest": format!("sha256:{}", "a".repeat(64))},
        "layers": [],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    let res = run_flatfs([std::ffi::OsStr::new("inspect"), dir.as_os_str()]);
    let stderr = assert_error(&res);
    assert!(stderr.contains("skopeo `dir:` copy"), "{stderr}");
    assert!(
        stderr.contains(&format!("skopeo copy dir:{} oci:", dir.display())),
        "{stderr}"
    );
}

/// `--layers 0` and an unknown man page are usage errors (exit 2), like `diff IMG 0`.
#[test]
fn layers_zero_and_unknown_man_page_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let image = tmp.path().join("img.tar");
    write_docker_archive(&layers, &default_config(&layers), &image);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let image = image.to_str().unwrap();
    let mnt = mnt.to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["ls", image, "--layers", "0"],
        &["mount", image, mnt, "--layers", "0"],
        &["diff", image, "0"],
        &["man", "nosuch"],
    ];
    for args in commands {
        let out = run_flatfs(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
