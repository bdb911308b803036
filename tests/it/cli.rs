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
