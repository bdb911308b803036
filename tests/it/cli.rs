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
