//! The merged tree: one test per rule of issue 2 ("The merged tree", rules 1-8) and per
//! case of its "Done when" list, each read back through `flatfs export --format rootfs`.
//!
//! Listing columns (see `util::tar_listing`):
//! `PATH TYPE MODE UID GID SIZE CONTENT XATTRS MTIME LINK`; builder entries have mtime
//! 1000, implicit directories mtime 0.
//! See: https://github.com/opencontainers/image-spec/blob/main/layer.md

use crate::util::*;

/// The listing without the lines for `path` and everything under it.
fn without(listing: &str, path: &str) -> String {
    let under = format!("{path}/");
    listing
        .lines()
        .filter(|l| {
            let p = l.split(' ').next().unwrap_or("");
            p != path && !p.starts_with(&under)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The line for `path`, if the listing has one.
fn line<'a>(listing: &'a str, path: &str) -> Option<&'a str> {
    listing.lines().find(|l| l.split(' ').next() == Some(path))
}

// --- Rule 1: a whiteout hides NAME and everything below it, in lower layers only -------

#[test]
fn whiteout_hides_lower_file() {
    let l1 = layer([file("a", "A"), file("b", "B")]);
    let l2 = layer([whiteout("a")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        b  f 0644 0 0 1 "B" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_of_dir_hides_its_children() {
    let l1 = layer([
        dir("d"),
        file("d/x", "x"),
        dir("d/e"),
        file("d/e/y", "y"),
        file("keep", "k"),
    ]);
    let l2 = layer([whiteout("d")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .     d 0755 0 0 - -   - 0    -
        keep  f 0644 0 0 1 "k" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_before_same_layer_entry_keeps_the_entry() {
    let l1 = layer([file("a", "old").mode(0o600)]);
    let l2 = layer([whiteout("a"), file("a", "new")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -     - 0    -
        a  f 0644 0 0 3 "new" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_after_same_layer_entry_keeps_the_entry() {
    let l1 = layer([file("a", "old").mode(0o600)]);
    let l2 = layer([file("a", "new"), whiteout("a")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -     - 0    -
        a  f 0644 0 0 3 "new" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_of_dir_recreated_in_same_layer_whiteout_first() {
    let l1 = layer([dir("d").mode(0o700), file("d/old", "o")]);
    let l2 = layer([whiteout("d"), dir("d"), file("d/new", "n")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .      d 0755 0 0 - -   - 0    -
        d      d 0755 0 0 - -   - 1000 -
        d/new  f 0644 0 0 1 "n" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_of_dir_recreated_in_same_layer_whiteout_last() {
    let l1 = layer([dir("d").mode(0o700), file("d/old", "o")]);
    let l2 = layer([dir("d"), file("d/new", "n"), whiteout("d")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .      d 0755 0 0 - -   - 0    -
        d      d 0755 0 0 - -   - 1000 -
        d/new  f 0644 0 0 1 "n" - 1000 -
        "#,
    );
}

#[test]
fn dir_whited_out_then_recreated_in_later_layer() {
    let l1 = layer([dir("d").mode(0o700), file("d/a", "a")]);
    let l2 = layer([whiteout("d")]);
    let l3 = layer([dir("d").mode(0o750).mtime(3000), file("d/b", "b")]);
    assert_listing(
        &listing_of(vec![l1, l2, l3]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0750 0 0 - -   - 3000 -
        d/b  f 0644 0 0 1 "b" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_of_dir_then_child_without_dir_entry_gets_a_default_parent() {
    // The whiteout removes the lower `d` before this layer's entries go in, so there is
    // no lower directory left whose metadata the implicit parent could keep (rule 5).
    let l1 = layer([dir("d").mode(0o700).uid(5).mtime(77), file("d/x", "x")]);
    let l2 = layer([file("d/y", "y"), whiteout("d")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0755 0 0 - -   - 0    -
        d/y  f 0644 0 0 1 "y" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_of_absent_path_changes_nothing() {
    let l1 = layer([file("a", "A")]);
    let l2 = layer([whiteout("nope")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        a  f 0644 0 0 1 "A" - 1000 -
        "#,
    );
}

// --- Rule 2: an opaque marker hides DIR's lower children, whatever its tar position ----

#[test]
fn opaque_marker_before_children_hides_only_lower_children() {
    let l1 = layer([
        dir("d").mode(0o700),
        file("d/a", "a"),
        dir("d/sub"),
        file("d/sub/x", "x"),
        file("e", "e"),
    ]);
    let l2 = layer([dir("d"), opaque("d"), file("d/b", "b")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0755 0 0 - -   - 1000 -
        d/b  f 0644 0 0 1 "b" - 1000 -
        e    f 0644 0 0 1 "e" - 1000 -
        "#,
    );
}

#[test]
fn opaque_marker_after_children_hides_only_lower_children() {
    let l1 = layer([
        dir("d").mode(0o700),
        file("d/a", "a"),
        dir("d/sub"),
        file("d/sub/x", "x"),
        file("e", "e"),
    ]);
    let l2 = layer([dir("d"), file("d/b", "b"), dir("d/c"), opaque("d")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0755 0 0 - -   - 1000 -
        d/b  f 0644 0 0 1 "b" - 1000 -
        d/c  d 0755 0 0 - -   - 1000 -
        e    f 0644 0 0 1 "e" - 1000 -
        "#,
    );
}

#[test]
fn opaque_marker_without_dir_entry_keeps_lower_dir_metadata() {
    let l1 = layer([dir("d").mode(0o700).uid(5).mtime(77), file("d/a", "a")]);
    let l2 = layer([opaque("d")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - - - 0  -
        d  d 0700 5 0 - - - 77 -
        "#,
    );
}

#[test]
fn opaque_marker_in_subdir_hides_only_that_dirs_children() {
    let l1 = layer([
        dir("d"),
        file("d/a", "a"),
        dir("d/sub"),
        file("d/sub/x", "x"),
    ]);
    let l2 = layer([dir("d/sub"), opaque("d/sub")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .      d 0755 0 0 - -   - 0    -
        d      d 0755 0 0 - -   - 1000 -
        d/a    f 0644 0 0 1 "a" - 1000 -
        d/sub  d 0755 0 0 - -   - 1000 -
        "#,
    );
}

// --- Rule 3: whiteouts are recognised by name only; .wh..wh.* is AUFS metadata ---------

#[test]
fn whiteout_written_as_hardlink_type() {
    let l1 = layer([file("a", "A"), file("b", "B"), file("c", "C")]);
    // Some tools store the first whiteout as a file and the rest as hardlinks to it.
    let l2 = layer([whiteout("a"), hardlink(".wh.b", ".wh.a")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        c  f 0644 0 0 1 "C" - 1000 -
        "#,
    );
}

#[test]
fn whiteout_with_mode_0755() {
    let l1 = layer([file("a", "A"), file("b", "B")]);
    let l2 = layer([whiteout("a").mode(0o755)]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        b  f 0644 0 0 1 "B" - 1000 -
        "#,
    );
}

#[test]
fn opaque_marker_written_as_hardlink_type() {
    let l1 = layer([dir("d"), file("d/a", "a"), file("z", "z")]);
    let l2 = layer([whiteout("z"), dir("d"), hardlink("d/.wh..wh..opq", ".wh.z")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - - - 0    -
        d  d 0755 0 0 - - - 1000 -
        "#,
    );
}

#[test]
fn bare_wh_prefix_is_an_error() {
    let l1 = layer([file("a", "A")]);
    let l2 = layer([dir("d"), file("d/.wh.", "")]);
    let (stderr, written) = export_error(vec![l1, l2]);
    assert!(
        stderr.contains("d/.wh."),
        "error does not name the entry:\n{stderr}"
    );
    assert_names_layer(&stderr, &written, 1);
}

#[test]
fn names_that_merely_contain_wh_are_ordinary_files() {
    let l1 = layer([
        file("a.wh.b", "1"),
        file(".wh_x", "2"),
        file("..wh.x", "3"),
        file("x.wh.", "4"),
        file("b.wh..wh..opq", "5"),
        file(".whx", "6"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .              d 0755 0 0 - -   - 0    -
        ..wh.x         f 0644 0 0 1 "3" - 1000 -
        .wh_x          f 0644 0 0 1 "2" - 1000 -
        .whx           f 0644 0 0 1 "6" - 1000 -
        a.wh.b         f 0644 0 0 1 "1" - 1000 -
        b.wh..wh..opq  f 0644 0 0 1 "5" - 1000 -
        x.wh.          f 0644 0 0 1 "4" - 1000 -
        "#,
    );
}

#[test]
fn aufs_wh_wh_names_are_skipped() {
    let l1 = layer([file("keep", "k"), dir("d"), file("d/x", "x")]);
    let l2 = layer([
        dir(".wh..wh.plnk"),
        hardlink(".wh..wh.plnk/1234.5678", "keep"),
        file(".wh..wh.aufs", ""),
        dir(".wh..wh.orph"),
        file("d/.wh..wh.other", ""),
    ]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .     d 0755 0 0 - -   - 0    -
        d     d 0755 0 0 - -   - 1000 -
        d/x   f 0644 0 0 1 "x" - 1000 -
        keep  f 0644 0 0 1 "k" - 1000 -
        "#,
    );
}

#[test]
fn whiteouts_and_opaque_markers_in_lowest_layer_are_not_visible() {
    let l1 = layer([whiteout("gone"), dir("d"), opaque("d"), file("d/x", "x")]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0755 0 0 - -   - 1000 -
        d/x  f 0644 0 0 1 "x" - 1000 -
        "#,
    );
}

// --- Rule 4: directory over directory merges; anything else replaces -------------------

#[test]
fn dir_over_dir_takes_upper_metadata_and_merges_children() {
    let l1 = layer([
        dir("d")
            .mode(0o700)
            .uid(1)
            .gid(2)
            .mtime(10)
            .xattr("user.low", "1"),
        file("d/a", "a"),
    ]);
    let l2 = layer([
        dir("d").mode(0o750).uid(3).gid(4).mtime(20),
        file("d/b", "b"),
    ]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        d    d 0750 3 4 - -   - 20   -
        d/a  f 0644 0 0 1 "a" - 1000 -
        d/b  f 0644 0 0 1 "b" - 1000 -
        "#,
    );
}

#[test]
fn file_over_file_replaces_content_and_metadata() {
    let l1 = layer([file("a", "old")
        .mode(0o600)
        .uid(1)
        .mtime(10)
        .xattr("user.x", "1")]);
    let l2 = layer([file("a", "new").uid(2)]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -     - 0    -
        a  f 0644 2 0 3 "new" - 1000 -
        "#,
    );
}

#[test]
fn file_replaced_by_dir() {
    let l1 = layer([file("a", "x")]);
    let l2 = layer([dir("a"), file("a/b", "b")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        a    d 0755 0 0 - -   - 1000 -
        a/b  f 0644 0 0 1 "b" - 1000 -
        "#,
    );
}

#[test]
fn dir_replaced_by_symlink() {
    let l1 = layer([dir("d"), file("d/x", "x"), dir("d/e"), file("d/e/y", "y")]);
    let l2 = layer([symlink("d", "/target")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -         - 0    -
        d  l 0777 0 0 7 ->/target - 1000 -
        "#,
    );
}

#[test]
fn dir_replaced_by_file_drops_its_children() {
    let l1 = layer([dir("d"), file("d/x", "x")]);
    let l2 = layer([file("d", "f")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        d  f 0644 0 0 1 "f" - 1000 -
        "#,
    );
}

#[test]
fn symlink_replaced_by_dir() {
    let l1 = layer([dir("x"), file("x/in-x", "1"), symlink("s", "x")]);
    let l2 = layer([dir("s").mode(0o700), file("s/f", "f")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .       d 0755 0 0 - -   - 0    -
        s       d 0700 0 0 - -   - 1000 -
        s/f     f 0644 0 0 1 "f" - 1000 -
        x       d 0755 0 0 - -   - 1000 -
        x/in-x  f 0644 0 0 1 "1" - 1000 -
        "#,
    );
}

// --- Rule 5: implicit parents ------------------------------------------------------------

#[test]
fn implicit_parents_without_any_entry_are_0755_root_mtime_0() {
    let l1 = layer([file("a/b/c", "c").uid(5).gid(6).mode(0o600)]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .      d 0755 0 0 - -   - 0    -
        a      d 0755 0 0 - -   - 0    -
        a/b    d 0755 0 0 - -   - 0    -
        a/b/c  f 0600 5 6 1 "c" - 1000 -
        "#,
    );
}

#[test]
fn implicit_parent_keeps_lower_dir_metadata() {
    let l1 = layer([
        dir("a")
            .mode(0o700)
            .uid(5)
            .gid(6)
            .mtime(50)
            .xattr("user.k", "v"),
        file("a/x", "x"),
    ]);
    let l2 = layer([file("a/y", "y")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   -          0    -
        a    d 0700 5 6 - -   user.k="v" 50   -
        a/x  f 0644 0 0 1 "x" -          1000 -
        a/y  f 0644 0 0 1 "y" -          1000 -
        "#,
    );
}

// --- Rule 6: paths are never resolved through symlinks -----------------------------------

fn etc_and_lib_symlink() -> Layer {
    layer([
        dir("etc"),
        file("etc/passwd", "root"),
        file("etc/group", "wheel"),
        symlink("lib", "/etc"),
    ])
}

const ETC: &str = r#"
    .           d 0755 0 0 - -       - 0    -
    etc         d 0755 0 0 - -       - 1000 -
    etc/group   f 0644 0 0 5 "wheel" - 1000 -
    etc/passwd  f 0644 0 0 4 "root"  - 1000 -
"#;

/// `lib` may stay the symlink or become an empty directory (what overlayfs shows for an
/// upper directory holding only whiteouts); nothing may appear under it.
#[track_caller]
fn assert_lib_untouched_or_empty_dir(listing: &str) {
    let lib = line(listing, "lib").expect("lib must still exist");
    let as_link = "lib l 0777 0 0 4 ->/etc - 1000 -";
    assert!(
        lib == as_link || lib.starts_with("lib d "),
        "lib should stay a symlink or become a directory, got: {lib}\n{listing}"
    );
    assert!(
        !listing.contains("\nlib/"),
        "nothing may appear under lib:\n{listing}"
    );
}

#[test]
fn whiteout_under_lower_symlink_changes_nothing_in_its_target() {
    let l2 = layer([whiteout("lib/passwd")]);
    let listing = listing_of(vec![etc_and_lib_symlink(), l2]);
    assert_listing(&without(&listing, "lib"), ETC);
    assert_lib_untouched_or_empty_dir(&listing);
}

#[test]
fn opaque_marker_under_lower_symlink_changes_nothing_in_its_target() {
    let l2 = layer([opaque("lib")]);
    let listing = listing_of(vec![etc_and_lib_symlink(), l2]);
    assert_listing(&without(&listing, "lib"), ETC);
    assert_lib_untouched_or_empty_dir(&listing);
}

#[test]
fn entry_under_lower_symlink_makes_it_a_directory() {
    let l2 = layer([file("lib/passwd", "new")]);
    assert_listing(
        &listing_of(vec![etc_and_lib_symlink(), l2]),
        r#"
        .           d 0755 0 0 - -       - 0    -
        etc         d 0755 0 0 - -       - 1000 -
        etc/group   f 0644 0 0 5 "wheel" - 1000 -
        etc/passwd  f 0644 0 0 4 "root"  - 1000 -
        lib         d 0755 0 0 - -       - 0    -
        lib/passwd  f 0644 0 0 3 "new"   - 1000 -
        "#,
    );
}

/// One layer with symlinks and entries through them: buildah's `symldir1 -> ..`, a chain,
/// a relative climb past the root, a dangling target, and a hardlink target through one.
pub fn same_layer_symlinks() -> Layer {
    layer([
        symlink("symldir1", ".."),
        file("symldir1/etc/myfile", "hello"),
        symlink("a", "b"),
        symlink("b", "/c/d"),
        file("a/x", "X"),
        dir("sub"),
        symlink("sub/up", "../.."),
        file("sub/up/top", "T"),
        symlink("s", "missing/dir"),
        file("s/y", "Y"),
        file("real/f", "R"),
        symlink("r", "real"),
        hardlink("link", "r/f"),
    ])
}

#[test]
fn entry_under_same_layer_symlink_lands_where_a_chrooted_extraction_puts_it() {
    // Written from `umoci unpack` of this layer (podman, overlay driver, agrees on the
    // buildah case): the symlinks stay, and what goes through them lands at their targets,
    // inside the root.
    assert_listing(
        &listing_of(vec![same_layer_symlinks()]),
        r#"
        .              d 0755 0 0 - -           - 0    -
        a              l 0777 0 0 1 ->b         - 1000 -
        b              l 0777 0 0 4 ->/c/d      - 1000 -
        c              d 0755 0 0 - -           - 0    -
        c/d            d 0755 0 0 - -           - 0    -
        c/d/x          f 0644 0 0 1 "X"         - 1000 -
        etc            d 0755 0 0 - -           - 0    -
        etc/myfile     f 0644 0 0 5 "hello"     - 1000 -
        link           f 0644 0 0 1 "R"         - 1000 -
        missing        d 0755 0 0 - -           - 0    -
        missing/dir    d 0755 0 0 - -           - 0    -
        missing/dir/y  f 0644 0 0 1 "Y"         - 1000 -
        r              l 0777 0 0 4 ->real      - 1000 -
        real           d 0755 0 0 - -           - 0    -
        real/f         f 0644 0 0 1 "R"         - 1000 =>link
        s              l 0777 0 0 11 ->missing/dir - 1000 -
        sub            d 0755 0 0 - -           - 1000 -
        sub/up         l 0777 0 0 5 ->../..     - 1000 -
        symldir1       l 0777 0 0 2 ->..        - 1000 -
        top            f 0644 0 0 1 "T"         - 1000 -
        "#,
    );
}

#[test]
fn symlink_loop_in_a_layer_is_an_error_naming_layer_and_entry() {
    let (stderr, written) = export_error(vec![layer([
        symlink("a", "b"),
        symlink("b", "a"),
        file("a/x", "X"),
    ])]);
    assert_names_layer(&stderr, &written, 0);
    assert!(
        stderr.contains("\"a/x\"") && stderr.contains("symbolic links"),
        "{stderr}"
    );
}

#[test]
fn entry_under_lower_file_makes_it_a_directory() {
    let l1 = layer([file("x", "f").mode(0o600).uid(9)]);
    let l2 = layer([file("x/y", "y")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        x    d 0755 0 0 - -   - 0    -
        x/y  f 0644 0 0 1 "y" - 1000 -
        "#,
    );
}

// --- Rule 7: hardlinks; duplicates within a layer -----------------------------------------

#[test]
fn hardlink_shares_content_and_metadata_of_same_layer_file() {
    let l1 = layer([
        file("a", "data")
            .mode(0o600)
            .uid(7)
            .gid(8)
            .mtime(5)
            .xattr("user.h", "1"),
        hardlink("b", "a"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0 0 - -      -          0 -
        a  f 0600 7 8 4 "data" user.h="1" 5 -
        b  f 0600 7 8 4 "data" user.h="1" 5 =>a
        "#,
    );
}

#[test]
fn hardlink_to_file_of_lower_layer() {
    let l1 = layer([file("a", "data").mode(0o640)]);
    let l2 = layer([hardlink("b", "a")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        a  f 0640 0 0 4 "data" - 1000 -
        b  f 0640 0 0 4 "data" - 1000 =>a
        "#,
    );
}

#[test]
fn hardlink_whose_target_is_whited_out() {
    let l1 = layer([file("a", "data").mode(0o600).uid(3), hardlink("b", "a")]);
    let l2 = layer([whiteout("a")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        b  f 0600 3 0 4 "data" - 1000 -
        "#,
    );
}

#[test]
fn hardlink_to_lower_file_whose_target_is_whited_out_later() {
    let l1 = layer([file("a", "data")]);
    let l2 = layer([hardlink("b", "a")]);
    let l3 = layer([whiteout("a")]);
    assert_listing(
        &listing_of(vec![l1, l2, l3]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        b  f 0644 0 0 4 "data" - 1000 -
        "#,
    );
}

#[test]
fn hardlink_whose_target_is_replaced_keeps_the_old_content() {
    let l1 = layer([file("a", "old"), hardlink("b", "a")]);
    let l2 = layer([file("a", "new").mode(0o600)]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -     - 0    -
        a  f 0600 0 0 3 "new" - 1000 -
        b  f 0644 0 0 3 "old" - 1000 -
        "#,
    );
}

#[test]
fn hardlink_whose_name_is_overwritten_later() {
    let l1 = layer([file("a", "data"), hardlink("b", "a")]);
    let l2 = layer([file("b", "new")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        a  f 0644 0 0 4 "data" - 1000 -
        b  f 0644 0 0 3 "new"  - 1000 -
        "#,
    );
}

#[test]
fn hardlink_survivors_stay_linked_and_first_name_is_the_file() {
    let l1 = layer([file("z", "data"), hardlink("c", "z"), hardlink("b", "z")]);
    let l2 = layer([whiteout("z")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        b  f 0644 0 0 4 "data" - 1000 -
        c  f 0644 0 0 4 "data" - 1000 =>b
        "#,
    );
}

#[test]
fn hardlink_chain_points_every_name_at_the_first() {
    let l1 = layer([file("a", "data"), hardlink("b", "a"), hardlink("c", "b")]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        a  f 0644 0 0 4 "data" - 1000 -
        b  f 0644 0 0 4 "data" - 1000 =>a
        c  f 0644 0 0 4 "data" - 1000 =>a
        "#,
    );
}

#[test]
fn whiteout_of_one_hardlink_name_keeps_the_other() {
    let l1 = layer([file("a", "data"), hardlink("b", "a")]);
    let l2 = layer([whiteout("b")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        a  f 0644 0 0 4 "data" - 1000 -
        "#,
    );
}

#[test]
fn hardlinks_to_symlink_fifo_and_device_stay_hardlinks() {
    let l1 = layer([
        symlink("s", "target"),
        hardlink("s2", "s"),
        fifo("p"),
        hardlink("p2", "p"),
        chardev("c", 1, 3),
        hardlink("c2", "c"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .   d 0755 0 0 - -        - 0    -
        c   c 0666 0 0 - 1,3      - 1000 -
        c2  c 0666 0 0 - 1,3      - 1000 =>c
        p   p 0644 0 0 - -        - 1000 -
        p2  p 0644 0 0 - -        - 1000 =>p
        s   l 0777 0 0 6 ->target - 1000 -
        s2  l 0777 0 0 6 ->target - 1000 =>s
        "#,
    );
}

#[test]
fn duplicate_path_within_one_layer_last_wins() {
    let l1 = layer([
        file("a", "one").mode(0o600),
        file("a", "two"),
        dir("d").mode(0o700),
        dir("d").mode(0o750),
        file("x", "file"),
        dir("x"),
        file("x/y", "y"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .    d 0755 0 0 - -     - 0    -
        a    f 0644 0 0 3 "two" - 1000 -
        d    d 0750 0 0 - -     - 1000 -
        x    d 0755 0 0 - -     - 1000 -
        x/y  f 0644 0 0 1 "y"   - 1000 -
        "#,
    );
}

// --- Rule 8: nothing is placed outside the root -------------------------------------------

#[test]
fn dotdot_entry_is_an_error_naming_layer_and_entry() {
    let l1 = layer([file("ok", "1")]);
    let l2 = layer([file("../x", "evil")]);
    let (stderr, written) = export_error(vec![l1, l2]);
    assert!(
        stderr.contains("../x"),
        "error does not name the entry:\n{stderr}"
    );
    assert_names_layer(&stderr, &written, 1);
}

#[test]
fn dotdot_leaving_root_from_subdir_is_an_error() {
    let l1 = layer([dir("a"), file("a/../../escape", "evil")]);
    let (stderr, written) = export_error(vec![l1]);
    assert!(
        stderr.contains("a/../../escape"),
        "error does not name the entry:\n{stderr}"
    );
    assert_names_layer(&stderr, &written, 0);
}

#[test]
fn hardlink_target_outside_root_is_an_error() {
    let l1 = layer([file("a", "1"), hardlink("evil-link", "../../etc/shadow")]);
    let (stderr, written) = export_error(vec![l1]);
    assert!(
        stderr.contains("evil-link") || stderr.contains("../../etc/shadow"),
        "error does not name the entry:\n{stderr}"
    );
    assert_names_layer(&stderr, &written, 0);
}

#[test]
fn absolute_and_dot_slash_paths_are_the_same_path() {
    let l1 = layer([
        file("/abs", "1"),
        file("./rel", "2"),
        dir("./d"),
        file("/d/x", "3"),
        dir("e/"),
        file("./e/y", "4"),
    ]);
    let l2 = layer([file("d/x", "5"), file("/rel", "6")]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .    d 0755 0 0 - -   - 0    -
        abs  f 0644 0 0 1 "1" - 1000 -
        d    d 0755 0 0 - -   - 1000 -
        d/x  f 0644 0 0 1 "5" - 1000 -
        e    d 0755 0 0 - -   - 1000 -
        e/y  f 0644 0 0 1 "4" - 1000 -
        rel  f 0644 0 0 1 "6" - 1000 -
        "#,
    );
}

#[test]
fn symlink_mode_is_exported_as_0777_as_the_kernel_shows_it() {
    // Writers put the umask's 0644 (or anything) in a symlink's header; Linux ignores it.
    let l1 = layer([
        file("a", "A"),
        symlink("s", "a").mode(0o644),
        symlink("t", "/a").mode(0o4700),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0 0 - -      - 0    -
        a  f 0644 0 0 1 "A"    - 1000 -
        s  l 0777 0 0 1 ->a    - 1000 -
        t  l 0777 0 0 2 ->/a   - 1000 -
        "#,
    );
}

#[test]
fn symlink_targets_are_kept_verbatim_even_outside_root() {
    let l1 = layer([
        symlink("rel", "../../../etc/shadow"),
        symlink("abs", "/etc/shadow"),
        symlink("dot", "./x/../y/"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .    d 0755 0 0 - -                       - 0    -
        abs  l 0777 0 0 11 ->/etc/shadow          - 1000 -
        dot  l 0777 0 0 9  ->./x/../y/            - 1000 -
        rel  l 0777 0 0 19 ->../../../etc/shadow  - 1000 -
        "#,
    );
}

// --- Entry encodings from the "Done when" list -------------------------------------------

#[test]
fn bare_dot_entry_sets_root_metadata() {
    let l1 = layer([
        dir(".").raw_path(".").mode(0o700).uid(1).mtime(42),
        file("a", "1"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0700 1 0 - -   - 42   -
        a  f 0644 0 0 1 "1" - 1000 -
        "#,
    );
}

#[test]
fn dot_slash_root_entry_sets_root_metadata_and_upper_root_wins() {
    let l1 = layer([dir("./").mode(0o700).mtime(42), file("./a", "1")]);
    let l2 = layer([dir(".").raw_path(".").mode(0o750).mtime(43)]);
    assert_listing(
        &listing_of(vec![l1, l2]),
        r#"
        .  d 0750 0 0 - -   - 43   -
        a  f 0644 0 0 1 "1" - 1000 -
        "#,
    );
}

fn long_name(parts: usize, each: usize) -> String {
    (0..parts)
        .map(|i| char::from(b'a' + i as u8).to_string().repeat(each))
        .collect::<Vec<_>>()
        .join("/")
}

fn long_link_layer(how: LongNames) -> (String, Layer) {
    let d = long_name(2, 60);
    let f = format!("{d}/file");
    let l = layer([
        file(&f, "x").long_names(how),
        symlink("s", format!("/{f}")).long_names(how),
        hardlink("h", &f).long_names(how),
    ]);
    (d, l)
}

fn long_link_expected(d: &str) -> String {
    let (a, _) = d.split_once('/').expect("two parts");
    format!(
        r#"
        .       d 0755 0 0 - -   - 0    -
        {a}     d 0755 0 0 - -   - 0    -
        {d}     d 0755 0 0 - -   - 0    -
        {d}/file f 0644 0 0 1 "x" - 1000 -
        h       f 0644 0 0 1 "x" - 1000 =>{d}/file
        s       l 0777 0 0 127 ->/{d}/file - 1000 -
        "#
    )
}

#[test]
fn link_target_longer_than_100_bytes() {
    let (d, l) = long_link_layer(LongNames::Pax);
    assert_listing(&listing_of(vec![l]), &long_link_expected(&d));
}

#[test]
fn link_target_longer_than_100_bytes_gnu_longlink() {
    let (d, l) = long_link_layer(LongNames::Gnu);
    assert_listing(&listing_of(vec![l]), &long_link_expected(&d));
}

fn long_path_expected(p: &str) -> String {
    let mut lines = String::from(". d 0755 0 0 - - - 0 -\n");
    let mut at = 0;
    while let Some(i) = p[at..].find('/') {
        lines += &format!("{} d 0755 0 0 - - - 0 -\n", &p[..at + i]);
        at += i + 1;
    }
    lines += &format!("{p} f 0644 0 0 4 \"long\" - 1000 -\n");
    lines
}

#[test]
fn path_longer_than_255_bytes() {
    let p = long_name(3, 100);
    assert!(p.len() > 255);
    let l = layer([file(&p, "long")]);
    assert_listing(&listing_of(vec![l]), &long_path_expected(&p));
}

#[test]
fn path_longer_than_255_bytes_gnu_longname() {
    let p = long_name(3, 100);
    let l = layer([file(&p, "long").long_names(LongNames::Gnu)]);
    assert_listing(&listing_of(vec![l]), &long_path_expected(&p));
}

#[test]
fn path_split_into_ustar_prefix_and_name() {
    let p = long_name(2, 90);
    assert!(p.len() > 100);
    let l = layer([file(&p, "long").long_names(LongNames::UstarPrefix)]);
    assert_listing(&listing_of(vec![l]), &long_path_expected(&p));
}

#[test]
fn non_utf8_names() {
    let l1 = layer([
        file(b"caf\xe9", "1"),
        dir(b"\xff\xfe"),
        file(b"\xff\xfe/\x80", "2"),
        symlink(b"l\xe9", b"t\xe9"),
        file("caf\u{e9}-utf8", "3"),
        hardlink(b"h\xe9", b"caf\xe9"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .                 d 0755 0 0 - -        - 0    -
        caf\xc3\xa9-utf8  f 0644 0 0 1 "3"      - 1000 -
        caf\xe9           f 0644 0 0 1 "1"      - 1000 -
        h\xe9             f 0644 0 0 1 "1"      - 1000 =>caf\xe9
        l\xe9             l 0777 0 0 2 ->t\xe9  - 1000 -
        \xff\xfe          d 0755 0 0 - -        - 1000 -
        \xff\xfe/\x80     f 0644 0 0 1 "2"      - 1000 -
        "#,
    );
}

#[test]
fn uid_3000000_via_pax_and_base256() {
    let l1 = layer([
        file("pax", "1").uid(3_000_000).gid(3_000_001),
        file("b256", "2")
            .uid(3_000_000)
            .gid(3_000_001)
            .big_ids(BigIds::Base256),
        dir("edge").uid(2_097_152).gid(2_097_151),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .     d 0755 0       0       - -   - 0    -
        b256  f 0644 3000000 3000001 1 "2" - 1000 -
        edge  d 0755 2097152 2097151 - -   - 1000 -
        pax   f 0644 3000000 3000001 1 "1" - 1000 -
        "#,
    );
}

#[test]
fn pax_ids_win_over_header_and_uname_is_ignored() {
    let l1 = layer([
        file("a", "1").uid(5).gid(5).pax("uid", "6").pax("gid", "7"),
        file("b", "2").uid(1000).uname("root"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0    0 - -   - 0    -
        a  f 0644 6    7 1 "1" - 1000 -
        b  f 0644 1000 0 1 "2" - 1000 -
        "#,
    );
}

#[test]
fn subsecond_mtime_is_kept() {
    let l1 = layer([
        file("a", "1").mtime_ns(1_700_000_000, 123_456_789),
        dir("d").mtime_ns(1_700_000_001, 500_000_000),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0 0 - -   - 0                    -
        a  f 0644 0 0 1 "1" - 1700000000.123456789 -
        d  d 0755 0 0 - -   - 1700000001.500000000 -
        "#,
    );
}

#[test]
fn binary_and_empty_xattrs() {
    // A file capability (cap_net_bind_service=ep), NUL and newline bytes included.
    let cap: &[u8] =
        b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x0a\x00\x00\x00\x00\x00\x00\x00";
    let l1 = layer([
        file("ping", "elf")
            .xattr("security.capability", cap)
            .xattr("user.empty", "")
            .xattr("user.text", "hello")
            .xattr("user.punct", "a;b=c"),
        dir("d").xattr("user.dir", "1"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .     d 0755 0 0 - -     - 0 -
        d     d 0755 0 0 - -     user.dir="1" 1000 -
        ping  f 0644 0 0 3 "elf" security.capability=0x0100000200040000000000000a00000000000000;user.empty="";user.punct=0x613b623d63;user.text="hello" 1000 -
        "#,
    );
}

#[test]
fn char_block_devices_and_fifos() {
    let l1 = layer([
        dir("dev"),
        chardev("dev/null", 1, 3),
        chardev("dev/big", 4095, 1_048_575),
        blockdev("dev/loop0", 7, 0),
        fifo("dev/initctl").mode(0o600),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .            d 0755 0 0 - -              - 0    -
        dev          d 0755 0 0 - -              - 1000 -
        dev/big      c 0666 0 0 - 4095,1048575   - 1000 -
        dev/initctl  p 0600 0 0 - -              - 1000 -
        dev/loop0    b 0660 0 0 - 7,0            - 1000 -
        dev/null     c 0666 0 0 - 1,3            - 1000 -
        "#,
    );
}

#[test]
fn setuid_setgid_sticky_and_000_modes() {
    let l1 = layer([
        file("suid", "1").mode(0o4755),
        file("sgid", "2").mode(0o2755),
        dir("tmp").mode(0o1777),
        file("none", "3").mode(0o000),
        dir("locked").mode(0o000),
        file("locked/inside", "4"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .              d 0755 0 0 - -   - 0    -
        locked         d 0000 0 0 - -   - 1000 -
        locked/inside  f 0644 0 0 1 "4" - 1000 -
        none           f 0000 0 0 1 "3" - 1000 -
        sgid           f 2755 0 0 1 "2" - 1000 -
        suid           f 4755 0 0 1 "1" - 1000 -
        tmp            d 1777 0 0 - -   - 1000 -
        "#,
    );
}

#[test]
fn s_ifmt_bits_in_mode_field_are_masked_off() {
    let l1 = layer([
        file("f", "1").mode(0o100644),
        file("suid", "2").mode(0o104755),
        dir("d").mode(0o040755),
        symlink("l", "f").mode(0o120777),
        fifo("p").mode(0o010600),
        chardev("c", 1, 5).mode(0o020666),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .     d 0755 0 0 - -   - 0    -
        c     c 0666 0 0 - 1,5 - 1000 -
        d     d 0755 0 0 - -   - 1000 -
        f     f 0644 0 0 1 "1" - 1000 -
        l     l 0777 0 0 1 ->f - 1000 -
        p     p 0600 0 0 - -   - 1000 -
        suid  f 4755 0 0 1 "2" - 1000 -
        "#,
    );
}

#[test]
fn global_pax_header_is_skipped() {
    let l1 = layer([
        global_pax_header(&[("comment", b"built by git archive")]),
        file("a", "1"),
    ]);
    assert_listing(
        &listing_of(vec![l1]),
        r#"
        .  d 0755 0 0 - -   - 0    -
        a  f 0644 0 0 1 "1" - 1000 -
        "#,
    );
}

#[test]
fn gnu_sparse_file_is_expanded() {
    let l1 = layer([
        gnu_sparse("sparse", 8192, &[(4096, b"hello"), (8192, b"")]),
        file("after", "1"),
    ]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("image");
    let layers = [l1];
    write_oci_layout(&layers, &default_config(&layers), &img, Some(OCI_REF));
    let mut real = vec![0u8; 8192];
    real[4096..4101].copy_from_slice(b"hello");
    assert_listing(
        &tar_listing(&export_rootfs(&img, &[])),
        &format!(
            r#"
            .       d 0755 0 0 -    -   - 0    -
            after   f 0644 0 0 1    "1" - 1000 -
            sparse  f 0644 0 0 8192 {}  - 1000 -
            "#,
            content(&real)
        ),
    );
}

// --- Layer encodings ----------------------------------------------------------------------

fn sample_entries() -> Vec<Entry> {
    // Large enough that gzip members and the end of the tar fall inside file data.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vec![
        dir("etc"),
        file("etc/hostname", "box"),
        file("big", big),
        symlink("link", "etc/hostname"),
        file("last", "end"),
    ]
}

fn sample_expected() -> String {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    format!(
        r#"
        .             d 0755 0 0 -      -              - 0    -
        big           f 0644 0 0 200000 {}             - 1000 -
        etc           d 0755 0 0 -      -              - 1000 -
        etc/hostname  f 0644 0 0 3      "box"          - 1000 -
        last          f 0644 0 0 3      "end"          - 1000 -
        link          l 0777 0 0 12     ->etc/hostname - 1000 -
        "#,
        content(&big)
    )
}

#[test]
fn uncompressed_layer() {
    let l = layer(sample_entries()).compression(Compression::None);
    assert_listing(&listing_of(vec![l]), &sample_expected());
}

#[test]
fn gzip_layer() {
    let l = layer(sample_entries()).compression(Compression::Gzip);
    assert_listing(&listing_of(vec![l]), &sample_expected());
}

#[test]
fn gzip_with_several_members() {
    let l = layer(sample_entries()).compression(Compression::GzipMembers(5));
    assert_listing(&listing_of(vec![l]), &sample_expected());
}

#[test]
fn zstd_layer() {
    let l = layer(sample_entries()).compression(Compression::Zstd);
    assert_listing(&listing_of(vec![l]), &sample_expected());
}

#[test]
fn tar_without_end_of_archive_blocks() {
    let l = layer(sample_entries())
        .compression(Compression::None)
        .omit_eof();
    assert_listing(&listing_of(vec![l]), &sample_expected());
}

#[test]
fn gzip_tar_without_end_of_archive_blocks_below_another_layer() {
    let l1 = layer(sample_entries())
        .compression(Compression::Gzip)
        .omit_eof();
    let l2 = layer([file("last", "new")]).omit_eof();
    let want = sample_expected().replace(r#""end""#, r#""new""#);
    assert_listing(&listing_of(vec![l1, l2]), &want);
}
