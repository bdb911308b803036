//! `inspect`, `ls`, `cat`, `diff`, `cache`, the progress bar and the generated docs (issue 6),
//! on images built here with known numbers.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use tempfile::TempDir;

use crate::util::*;

const MIB: usize = 1 << 20;

/// Layer 1: a 1 MiB file, a small one, a dir and a symlink; layer 2 deletes the big file,
/// changes the small one and adds one; layer 3 adds a file under an absolute symlink's target.
fn image(dir: &Path) -> PathBuf {
    let layers = vec![
        layer([
            dir_entry("etc"),
            file("etc/big.bin", vec![7u8; MIB]),
            file("etc/small.txt", b"v1\n"),
            symlink("etc/link", "/data/target.txt"),
        ]),
        layer([
            whiteout("etc/big.bin"),
            file("etc/small.txt", b"version 2\n"),
            file("added.txt", b"new\n"),
        ])
        .compression(Compression::Gzip),
        layer([
            dir_entry("data"),
            file("data/target.txt", b"through the link\n"),
        ]),
    ];
    let path = dir.join("img");
    write_oci_layout(&layers, &default_config(&layers), &path, Some("latest"));
    path
}

fn dir_entry(p: &str) -> Entry {
    dir(p)
}

struct Env {
    _tmp: TempDir,
    image: PathBuf,
    cache: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = image(tmp.path());
    let cache = tmp.path().join("cache");
    Env {
        _tmp: tmp,
        image,
        cache,
    }
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        flatfs()
            .env("FLATFS_CACHE_DIR", &self.cache)
            .args(args)
            .output()
            .expect("run flatfs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out);
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    fn img(&self) -> &str {
        self.image.to_str().expect("utf-8 path")
    }
}

#[test]
fn inspect_json_numbers_match_what_the_image_holds() {
    let e = env();
    let v: Value = serde_json::from_str(&e.ok(&["inspect", "--json", e.img()])).expect("JSON");
    assert_eq!(v["format"], "oci-layout");
    assert_eq!(v["config"]["cmd"], serde_json::json!(["cat /message.txt"]));
    assert_eq!(v["config"]["working_dir"], "/srv");
    assert_eq!(v["config"]["user"], "1000:1000");
    assert_eq!(
        v["config"]["exposed_ports"],
        serde_json::json!(["8080/tcp"])
    );
    let layers = v["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 3);
    let l1 = &layers[0];
    assert_eq!(
        (
            l1["number"].as_u64(),
            l1["entries"].as_u64(),
            l1["added"].as_u64()
        ),
        (Some(1), Some(4), Some(3))
    );
    assert_eq!(l1["removed_bytes"], 0);
    // The big file is hidden by layer 2, and the small one replaced: 1 MiB + 3 bytes hidden.
    assert_eq!(l1["hidden_bytes"].as_u64(), Some(MIB as u64 + 3));
    assert_eq!(
        l1["empty_history_before"],
        serde_json::json!(["/bin/sh -c #(nop)  ENV GREETING=hello"])
    );
    assert_eq!(l1["created_by"], "/bin/sh -c build-step-1");
    let l2 = &layers[1];
    assert_eq!(
        (
            l2["added"].as_u64(),
            l2["changed"].as_u64(),
            l2["whited_out"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    // Deleting the 1 MiB file and replacing the 3-byte one: that is the waste.
    assert_eq!(l2["removed_bytes"].as_u64(), Some(MIB as u64 + 3));
    assert!(
        l2["compressed_size"].as_u64() < l2["uncompressed_size"].as_u64(),
        "layer 2 is gzip"
    );
    let t = &v["totals"];
    assert_eq!(t["waste"].as_u64(), Some(MIB as u64 + 3));
    assert_eq!(t["merged_size"].as_u64(), Some(10 + 4 + 17));
    // ".", etc, etc/small.txt, etc/link, added.txt, data, data/target.txt
    assert_eq!(t["entries"].as_u64(), Some(7));
}

#[test]
fn inspect_table_shows_the_waste_per_layer() {
    let e = env();
    let text = e.ok(&["inspect", e.img()]);
    let row2 = text
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .expect("row for layer 2");
    assert!(row2.contains("1.0 MiB"), "layer 2 removes 1 MiB: {row2}");
    assert!(row2.contains("build-step-2"), "{row2}");
    assert!(
        text.contains("ENV GREETING=hello"),
        "empty-layer history shown:\n{text}"
    );
    assert!(text.contains("flattening removes 1.0 MiB"), "{text}");
}

#[test]
fn ls_lists_like_ls_and_tar() {
    let e = env();
    assert_eq!(e.ok(&["ls", e.img()]), "added.txt\ndata\netc\n");
    assert_eq!(e.ok(&["ls", e.img(), "/etc"]), "link\nsmall.txt\n");
    let long = e.ok(&["ls", "-l", e.img(), "etc/small.txt"]);
    assert!(
        long.starts_with("-rw-r--r--   1     0     0         10 "),
        "{long:?}"
    );
    assert!(long.trim_end().ends_with("etc/small.txt"), "{long:?}");
    let link = e.ok(&["ls", "-l", e.img(), "etc"]);
    assert!(link.contains("link -> /data/target.txt"), "{link}");
    assert_eq!(
        e.ok(&["ls", "-R", "--layer", e.img()]),
        "  - .\n  2 added.txt\n  3 data\n  3 data/target.txt\n  1 etc\n  1 etc/link\n  2 etc/small.txt\n"
    );
    assert_eq!(
        e.ok(&["ls", "--layers", "1", e.img(), "etc"]),
        "big.bin\nlink\nsmall.txt\n"
    );
}

#[test]
fn ls_long_shows_symlinks_as_lrwxrwxrwx_whatever_the_header_says() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layers = vec![layer([file("a", "A"), symlink("s", "a").mode(0o644)])];
    let img = tmp.path().join("img");
    write_oci_layout(&layers, &default_config(&layers), &img, Some("latest"));
    let out = flatfs()
        .env("FLATFS_CACHE_DIR", tmp.path().join("cache"))
        .args(["ls", "-l"])
        .arg(&img)
        .output()
        .expect("run flatfs");
    assert_success(&out);
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let long = text
        .lines()
        .find(|l| l.ends_with(" s -> a"))
        .unwrap_or_else(|| panic!("no line for s:\n{text}"));
    assert!(long.starts_with("lrwxrwxrwx "), "{long:?}");
}

#[test]
fn cat_prints_files_and_follows_symlinks_inside_the_image() {
    let e = env();
    assert_eq!(
        e.ok(&["cat", e.img(), "etc/small.txt", "added.txt"]),
        "version 2\nnew\n"
    );
    // An absolute target resolves against the image root, never the host's.
    assert_eq!(e.ok(&["cat", e.img(), "/etc/link"]), "through the link\n");
    for bad in ["etc", "etc/big.bin", "../../etc/passwd"] {
        let err = assert_error(&e.run(&["cat", e.img(), bad]));
        assert!(
            err.contains(bad.trim_start_matches("../../")) || err.contains(bad),
            "{bad}: {err}"
        );
    }
}

#[test]
fn diff_lists_added_modified_deleted_with_sizes() {
    let e = env();
    assert_eq!(
        e.ok(&["diff", e.img(), "2"]),
        "+          4 added.txt\n-    1048576 etc/big.bin\n~         10 etc/small.txt\n"
    );
    let all = e.ok(&["diff", e.img(), "--from", "0", "--to", "3"]);
    assert!(all.lines().all(|l| l.starts_with('+')), "{all}");
    assert_eq!(all.lines().count(), 6, "{all}");
    assert_error(&e.run(&["diff", e.img(), "4"]));
}

#[test]
fn cache_makes_the_second_run_skip_indexing_and_survives_corruption() {
    let e = env();
    let first = e.run(&["-v", "inspect", "--json", e.img()]);
    assert_success(&first);
    assert!(
        !stderr_of(&first).contains("from cache"),
        "{}",
        stderr_of(&first)
    );
    let second = e.run(&["-v", "inspect", "--json", e.img()]);
    assert!(
        stderr_of(&second).contains("index from cache"),
        "{}",
        stderr_of(&second)
    );
    assert_eq!(first.stdout, second.stdout);
    let ls = e.ok(&["cache", "ls"]);
    assert_eq!(ls.lines().count(), 3, "{ls}");
    // Corrupt every cache file: they must be ignored and rebuilt, the answer unchanged.
    for f in std::fs::read_dir(&e.cache).expect("cache dir") {
        let p = f.expect("entry").path();
        let mut bytes = std::fs::read(&p).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&p, bytes).expect("write");
    }
    let third = e.run(&["-v", "inspect", "--json", e.img()]);
    assert_success(&third);
    assert!(
        !stderr_of(&third).contains("from cache"),
        "corrupt files were trusted"
    );
    assert_eq!(first.stdout, third.stdout);
    assert!(e.ok(&["cache", "du"]).contains("3 layer indexes"));
    e.ok(&["cache", "clear"]);
    assert_eq!(e.ok(&["cache", "ls"]), "");
    let nocache = e.run(&["--no-cache", "inspect", e.img()]);
    assert_success(&nocache);
    assert_eq!(e.ok(&["cache", "ls"]), "", "--no-cache wrote to the cache");
}

#[test]
fn progress_bar_only_on_a_terminal() {
    let e = env();
    let out = e.run(&["export", e.img(), "-o", "-", "--format", "rootfs"]);
    assert_success(&out);
    let err = stderr_of(&out);
    assert!(
        !err.contains("exporting") && !err.contains('\r'),
        "bar drawn without a terminal: {err:?}"
    );
    assert!(
        err.contains("flattened 3 layers"),
        "summary expected: {err:?}"
    );
    let quiet = e.run(&["-q", "export", e.img(), "-o", "-", "--format", "rootfs"]);
    assert_eq!(stderr_of(&quiet), "", "-q must silence stderr");

    // Under a pseudo-terminal the bar is drawn, for an image big enough to watch: see
    // cli::progress_line_fits_the_terminal_and_tiny_images_get_none.
}

#[test]
fn completions_man_page_and_version() {
    let e = env();
    for shell in ["bash", "zsh", "fish"] {
        let s = e.ok(&["completions", shell]);
        assert!(
            s.contains("flatfs") && s.contains("export") && s.len() > 500,
            "{shell}"
        );
    }
    let man = e.ok(&["man"]);
    assert!(
        man.contains(".TH flatfs 1") && man.contains("export"),
        "{man}"
    );
    assert_eq!(
        e.ok(&["--version"]),
        format!("flatfs {}\n", env!("CARGO_PKG_VERSION"))
    );
    let usage = e.run(&["export"]);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
}
