// Command gotar writes a layer tar from a directory the way Docker, buildah and containerd
// do: Go's archive/tar, headers from tar.FileInfoHeader (mode with its type bits), PAX for
// what ustar cannot hold, xattrs as SCHILY.xattr records, hardlinks by inode, and the
// overlay whiteouts `.wh.NAME` and `.wh..wh..opq` for an upper layer. The flatfs corpus
// test (tests/it/writers.rs) builds it with the stdlib only and feeds its output to flatfs.
//
// Usage: gotar [-moby | -gnu] [-whiteout PATH]... [-opaque DIR]... SRC OUT
package main

import (
	"archive/tar"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var whiteouts, opaques list
	moby := flag.Bool("moby", false, "as moby's pkg/archive: PAX headers, file type bits in the mode")
	gnu := flag.Bool("gnu", false, "GNU headers (long name entries, base-256 numbers) throughout")
	flag.Var(&whiteouts, "whiteout", "write a whiteout for this path (repeatable)")
	flag.Var(&opaques, "opaque", "write an opaque marker in this directory (repeatable)")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: gotar [-moby | -gnu] [-whiteout PATH]... [-opaque DIR]... SRC OUT")
		os.Exit(2)
	}
	format := tar.FormatUnknown
	if *gnu {
		format = tar.FormatGNU
	}
	if err := write(flag.Arg(0), flag.Arg(1), *moby, format, whiteouts, opaques); err != nil {
		fmt.Fprintln(os.Stderr, "gotar:", err)
		os.Exit(1)
	}
}

func write(src, out string, moby bool, format tar.Format, whiteouts, opaques []string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	// Opaque markers and whiteouts first, as buildah's and containerd's differs emit
	// them before the directory's new content.
	for _, d := range opaques {
		if err := marker(tw, path.Join(d, ".wh..wh..opq")); err != nil {
			return err
		}
	}
	for _, p := range whiteouts {
		if err := marker(tw, path.Join(path.Dir(p), ".wh."+path.Base(p))); err != nil {
			return err
		}
	}
	links := map[uint64]string{}
	err = filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil || rel == "." {
			return err
		}
		return add(tw, p, filepath.ToSlash(rel), fi, moby, format, links)
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func marker(tw *tar.Writer, name string) error {
	return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Format: tar.FormatPAX})
}

func add(tw *tar.Writer, p, name string, fi os.FileInfo, moby bool, format tar.Format, links map[uint64]string) error {
	target := ""
	if fi.Mode()&os.ModeSymlink != 0 {
		t, err := os.Readlink(p)
		if err != nil {
			return err
		}
		target = t
	}
	hdr, err := tar.FileInfoHeader(fi, target)
	if err != nil {
		return err
	}
	hdr.Name = name
	if fi.IsDir() {
		hdr.Name += "/"
	}
	st := fi.Sys().(*syscall.Stat_t)
	// FileInfoHeader fills in user and group names from /etc/passwd; layers carry ids.
	hdr.Uname, hdr.Gname = "", ""
	hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
	hdr.Devmajor = int64((st.Rdev >> 8) & 0xfff)
	hdr.Devminor = int64((st.Rdev & 0xff) | ((st.Rdev >> 12) & 0xfff00))
	// FileInfoHeader sets atime and ctime, which only PAX and GNU headers hold; moby and
	// containerd clear them, so Go writes ustar headers wherever they suffice.
	hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
	hdr.Format = format
	if moby {
		// moby's FileInfoHeader keeps the S_IFMT bits Go's archive/tar wrote before Go 1.9.
		hdr.Format = tar.FormatPAX
		hdr.Mode |= int64(st.Mode & syscall.S_IFMT)
	}
	// syscall has no llistxattr: read xattrs of files and directories only, never through
	// a symlink (Linux allows no user.* xattrs on symlinks anyway).
	if fi.Mode().IsRegular() || fi.IsDir() {
		if err := xattrs(p, hdr); err != nil {
			return err
		}
	}
	// Any name of an inode with more links but a directory is a hardlink, as moby does:
	// symlinks and fifos can be hardlinked too.
	if !fi.IsDir() && st.Nlink > 1 {
		if first, ok := links[st.Ino]; ok {
			hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			return tw.WriteHeader(hdr)
		}
		links[st.Ino] = name
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	r, err := os.Open(p)
	if err != nil {
		return err
	}
	defer r.Close()
	_, err = io.Copy(tw, r)
	return err
}

func xattrs(p string, hdr *tar.Header) error {
	buf := make([]byte, 64<<10)
	n, err := syscall.Listxattr(p, buf)
	if err != nil || n == 0 {
		return nil
	}
	names := strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00")
	sort.Strings(names)
	for _, name := range names {
		val := make([]byte, 64<<10)
		m, err := syscall.Getxattr(p, name, val)
		if err != nil {
			return fmt.Errorf("%s: getxattr %s: %w", p, name, err)
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords["SCHILY.xattr."+name] = string(val[:m])
	}
	return nil
}
