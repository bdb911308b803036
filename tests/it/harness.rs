//! Checks of the test harness itself, without flatfs: when a merge or export test fails,
//! these show the builder and the listing are not the ones to blame.

use std::io::Read;

use serde_json::Value;

use crate::util::*;

#[test]
fn harness_builder_tar_reads_back_as_described() {
    let long = format!("{}/{}", "p".repeat(70), "q".repeat(70));
    let l = layer([
        dir("."),
        dir("d").mode(0o1777).uid(3_000_000).gid(7),
        file("d/f", "data")
            .mode(0o4755)
            .mtime_ns(5, 250_000_000)
            .xattr("security.capability", b"\x01\x00\n")
            .xattr("user.empty", ""),
        file(format!("{long}/pax"), "1"),
        file(format!("{long}/gnu"), "2").long_names(LongNames::Gnu),
        file(format!("{long}/ustar"), "3").long_names(LongNames::UstarPrefix),
        file(b"\xff", "4").uid(2_097_152).big_ids(BigIds::Base256),
        symlink("s", format!("/{long}/pax")),
        hardlink("h", format!("{long}/gnu")).long_names(LongNames::Gnu),
        chardev("c", 4095, 1_048_575),
        blockdev("b", 7, 1),
        fifo("p"),
    ]);
    let (p, q) = ("p".repeat(70), "q".repeat(70));
    assert_listing(
        &tar_listing(&l.tar()),
        &format!(
            r#"
            .            d 0755 0       0 -   -          - 1000 -
            b            b 0660 0       0 -   7,1        - 1000 -
            c            c 0666 0       0 -   4095,1048575 - 1000 -
            d            d 1777 3000000 7 -   -          - 1000 -
            d/f          f 4755 0       0 4   "data"     security.capability=0x01000a;user.empty="" 5.250000000 -
            h            f 0644 0       0 1   "2"        - 1000 =>{p}/{q}/gnu
            p            p 0644 0       0 -   -          - 1000 -
            {p}/{q}/gnu   f 0644 0       0 1   "2"        - 1000 -
            {p}/{q}/pax   f 0644 0       0 1   "1"        - 1000 -
            {p}/{q}/ustar f 0644 0       0 1   "3"        - 1000 -
            s            l 0777 0       0 146 ->/{p}/{q}/pax - 1000 -
            \xff         f 0644 2097152 0 1   "4"        - 1000 -
            "#
        ),
    );
}

#[test]
fn harness_raw_entries_show_how_names_are_stored() {
    let long = "n".repeat(150);
    let l = layer([
        file(&long, "1"),
        file(&long, "2").long_names(LongNames::Gnu),
        file("short", "3").uid(3_000_000),
        symlink("l", &long).long_names(LongNames::Gnu),
    ]);
    let raw = raw_entries(&l.tar());
    assert_eq!(raw.len(), 4);
    assert_eq!(raw[0].pax_value("path"), Some(long.as_bytes()));
    assert!(raw[1].gnu_long_name && raw[1].pax_value("path").is_none());
    assert_eq!(raw[1].name, long.as_bytes());
    assert_eq!(raw[2].pax_value("uid"), Some(&b"3000000"[..]));
    assert!(raw[3].gnu_long_link && raw[3].link == long.as_bytes());
}

#[test]
fn harness_pax_record_length_counts_itself() {
    // Key and value lengths chosen so the record length crosses 10 and 100.
    for value_len in [0, 1, 2, 3, 4, 5, 6, 88, 89, 90, 91, 92, 93, 994, 995, 996] {
        let value = "v".repeat(value_len);
        let l = layer([file("f", "").pax("k", &value)]);
        assert_eq!(
            raw_entries(&l.tar())[0].pax_value("k"),
            Some(value.as_bytes())
        );
    }
}

#[test]
fn harness_gzip_members_are_separate_and_decompress_to_the_tar() {
    let big: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let l = layer([file("big", &big), file("x", "x")]).compression(Compression::GzipMembers(4));
    let blob = l.blob(Compression::None);
    let mut first = Vec::new();
    flate2::read::GzDecoder::new(&blob.bytes[..])
        .read_to_end(&mut first)
        .expect("first member");
    assert!(
        first.len() < l.tar().len(),
        "expected more than one gzip member"
    );
    assert_eq!(decompress(&blob.bytes), l.tar());
    assert_eq!(blob.media_type, MT_LAYER_GZIP);
}

#[test]
fn harness_omit_eof_drops_the_zero_blocks() {
    let l = layer([file("a", "1")]);
    assert_eq!(l.tar().len(), 512 * 4);
    assert_eq!(l.clone().omit_eof().tar().len(), 512 * 2);
}

#[test]
fn harness_gnu_sparse_entry_expands_with_the_tar_crate() {
    let l = layer([gnu_sparse("s", 8192, &[(4096, b"hello"), (8192, b"")])]);
    let mut real = vec![0u8; 8192];
    real[4096..4101].copy_from_slice(b"hello");
    let tar = l.tar();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entries = archive.entries().expect("entries");
    let mut e = entries.next().expect("one entry").expect("entry");
    let mut data = Vec::new();
    e.read_to_end(&mut data).expect("read sparse");
    assert_eq!(data, real);
}

#[test]
fn harness_expected_sorts_in_rootfs_order() {
    assert_eq!(
        expected("a-c f\n a/b f\n . d\n a d\n \\xff d\n a0 f\n"),
        ". d\na d\na/b f\na-c f\na0 f\n\\xff d\n"
    );
}

fn blob(dir: &std::path::Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(dir.join("blobs/sha256").join(hex)).expect("read blob")
}

#[test]
fn harness_oci_layout_is_consistent() {
    let layers = vec![
        layer([file("a", "1")]),
        layer([whiteout("a")]).compression(Compression::Zstd),
        layer([file("b", "2")]).compression(Compression::None),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let written = write_oci_layout(&layers, &default_config(&layers), tmp.path(), Some("x"));
    let index: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("index.json")).expect("index"))
            .expect("index json");
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["org.opencontainers.image.ref.name"],
        "x"
    );
    let manifest_bytes = blob(tmp.path(), desc["digest"].as_str().expect("digest"));
    assert_eq!(digest_of(&manifest_bytes), written.manifest_digest);
    let manifest: Value = serde_json::from_slice(&manifest_bytes).expect("manifest");
    let config_bytes = blob(
        tmp.path(),
        manifest["config"]["digest"].as_str().expect("digest"),
    );
    let config: Value = serde_json::from_slice(&config_bytes).expect("config");
    let media: Vec<&str> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["mediaType"].as_str().expect("media type"))
        .collect();
    assert_eq!(media, [MT_LAYER_GZIP, MT_LAYER_ZSTD, MT_LAYER_TAR]);
    for (i, l) in manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .enumerate()
    {
        let bytes = blob(tmp.path(), l["digest"].as_str().expect("digest"));
        assert_eq!(digest_of(&bytes), l["digest"]);
        assert_eq!(bytes.len() as u64, l["size"]);
        assert_eq!(
            digest_of(&decompress(&bytes)),
            config["rootfs"]["diff_ids"][i]
        );
    }
    let non_empty = config["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["empty_layer"] != true)
        .count();
    assert_eq!(non_empty, layers.len());
}

#[test]
fn harness_tampered_and_truncated_layers_fail_their_checks() {
    let good = layer([file("a", "1")]).compression(Compression::None);
    let tampered = good.clone().stored_as(layer([file("a", "2")]));
    let b = tampered.blob(Compression::None);
    assert_ne!(digest_of(&b.bytes), b.digest);
    assert_ne!(digest_of(&decompress(&b.bytes)), b.diff_id);

    let cut = layer([file("a", "1")])
        .compression(Compression::Gzip)
        .truncate_blob(10);
    let b = cut.blob(Compression::None);
    assert_eq!(digest_of(&b.bytes), b.digest);
    let mut out = Vec::new();
    let res = flate2::read::MultiGzDecoder::new(&b.bytes[..]).read_to_end(&mut out);
    assert!(
        res.is_err(),
        "a truncated gzip stream must not decode cleanly"
    );
}

#[test]
fn harness_docker_archives_are_consistent() {
    let layers = vec![layer([file("a", "1")]), layer([file("b", "2")])];
    let config = default_config(&layers);
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, docker25) in [("classic.tar", false), ("d25.tar", true)] {
        let path = tmp.path().join(name);
        let written = if docker25 {
            write_docker25_archive(&layers, &config, &path)
        } else {
            write_docker_archive(&layers, &config, &path)
        };
        let files = tar_files(&std::fs::read(&path).expect("read"));
        let manifest: Value =
            serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
        let m = &manifest[0];
        assert_eq!(m["RepoTags"][0], DOCKER_TAG);
        let config_bytes = &files[m["Config"].as_str().expect("Config")];
        assert_eq!(*config_bytes, written.config);
        let config: Value = serde_json::from_slice(config_bytes).expect("config");
        for (i, l) in m["Layers"].as_array().expect("Layers").iter().enumerate() {
            let tar = &files[l.as_str().expect("layer path")];
            assert_eq!(digest_of(tar), config["rootfs"]["diff_ids"][i]);
        }
        assert_eq!(files.contains_key("index.json"), docker25, "{name}");
    }
}
