package tmpfs

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Magic is statfs's f_type of a tmpfs.
const Magic = 0x01021994

// ErrNoswap means the kernel cannot keep a tmpfs out of swap (the noswap option needs Linux 6.4+).
var ErrNoswap = errors.New("tmpfs noswap is not supported by this kernel (Linux 6.4+)")

// ErrScrub marks an error of Swap or Clear that did not stop it: the new set is in force (or the
// files are gone), but an old file could not be overwritten first (a pod holds a lease on it, say).
// Callers log it; they need not retry.
var ErrScrub = errors.New("an old file was removed without being overwritten")

// MountOptions configure Mount.
type MountOptions struct {
	// Size bounds the tmpfs, in bytes.
	Size int64
	// Mode is the root directory's mode; GID, if >= 0, its group (the pod's fsGroup).
	Mode os.FileMode
	GID  int
	// AllowSwap mounts without noswap when the kernel lacks it (instead of failing with ErrNoswap).
	AllowSwap bool
}

// Mount mounts a tmpfs at target (an existing directory) with nodev, nosuid and noexec, and noswap
// so that its pages are never written to a swap device. Without kernel support for noswap it fails
// with ErrNoswap unless o.AllowSwap is set. It reports whether noswap is in effect.
func Mount(target string, o MountOptions) (noswap bool, err error) {
	if o.Size <= 0 {
		return false, fmt.Errorf("tmpfs size %d: must be positive", o.Size)
	}
	data := "size=" + strconv.FormatInt(o.Size, 10) + ",mode=" + strconv.FormatUint(uint64(o.Mode.Perm()), 8)
	if o.GID >= 0 {
		data += ",gid=" + strconv.Itoa(o.GID)
	}
	// Mounted on the directory itself, through a descriptor opened without following a link: a link
	// swapped in after the caller checked the path is not followed.
	dfd, err := unix.Open(target, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	defer unix.Close(dfd)
	at := "/proc/self/fd/" + strconv.Itoa(dfd)
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID | unix.MS_NOEXEC)
	if err := unix.Mount("tmpfs", at, "tmpfs", flags, data+",noswap"); err == nil {
		return true, nil
	} else if !errors.Is(err, unix.EINVAL) {
		return false, fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	if !o.AllowSwap {
		return false, ErrNoswap
	}
	if err := unix.Mount("tmpfs", at, "tmpfs", flags, data); err != nil {
		return false, fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	return false, nil
}

// ProbeNoswap mounts and unmounts a small tmpfs in a temporary directory under dir to learn whether
// the kernel supports noswap.
func ProbeNoswap(dir string) (bool, error) {
	d, err := os.MkdirTemp(dir, ".keyward-noswap-probe-")
	if err != nil {
		return false, err
	}
	defer os.Remove(d)
	err = unix.Mount("tmpfs", d, "tmpfs", unix.MS_NODEV|unix.MS_NOSUID|unix.MS_NOEXEC, "size=4096,noswap")
	if errors.Is(err, unix.EINVAL) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("probing tmpfs noswap: %w", err)
	}
	return true, unix.Unmount(d, 0)
}

// SwapActive reports whether any swap device is in use (from /proc/swaps).
func SwapActive() (bool, error) {
	b, err := os.ReadFile("/proc/swaps")
	if err != nil {
		return false, err
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return len(lines) > 1, nil // the first line is the header
}

// IsTmpfs reports whether path is on a tmpfs.
func IsTmpfs(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == Magic, nil
}

// IsMountPoint reports whether path (not followed if it is a symlink) is the root of a mount: its
// device differs from its parent's.
func IsMountPoint(path string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false, nil
	}
	if err := unix.Lstat(filepath.Dir(filepath.Clean(path)), &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino, nil
}

// Published reports whether target is a directory (not a symlink) on which a tmpfs is mounted. A
// missing target is not published; any other error is returned, so a caller never mounts a second
// tmpfs over a live volume it merely failed to inspect.
func Published(target string) (bool, error) {
	mp, err := IsMountPoint(target)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil || !mp {
		return false, err
	}
	return IsTmpfs(target)
}

// Unmount scrubs the files the driver delivered into the tmpfs at target (see Volume.Clear), then
// unmounts it. A missing target, or one with nothing mounted, is fine (idempotent). A mount point
// that is not a tmpfs is refused: it is not one of ours. A failed scrub does not keep the volume
// mounted (unmounting frees its pages; a pod must not be kept from terminating): it is returned as
// scrubErr, for the log.
func Unmount(target string, limit int64) (scrubErr, err error) {
	mp, err := IsMountPoint(target)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !mp {
		return nil, nil
	}
	v, err := Open(target, limit)
	if err != nil {
		return nil, err
	}
	scrubErr = v.Clear()
	v.Close()
	if err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) {
		return scrubErr, fmt.Errorf("unmount %s: %w", target, err)
	}
	return scrubErr, nil
}

// File is one file to deliver.
type File struct {
	Name string
	Mode os.FileMode
	Data []byte
}

// The names the driver creates in a volume: the "..data" link to the payload in force, the
// temporary link swapped over it, and payload directories "..<UTC time>.<random>".
const (
	dataLink    = "..data"
	dataTmpLink = "..data_tmp"
	// VersionFile is the one delivered name of the driver's own: a file describing the payload
	// (which version of what it holds, never a value), written into the payload and linked through
	// "..data" like the others, so it swaps with them. At most MaxVersionSize bytes.
	VersionFile = "..version"
	// chunk is the unit of scrubbing and comparing: memory stays bounded whatever a file claims.
	chunk = 64 << 10
)

// resolve is how every path inside a volume is resolved: one component, below the volume's root, on
// the same mount, never through a symlink (the kernel refuses with ELOOP/EXDEV).
const resolve = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// Volume is an open tmpfs volume. Every operation inside it is relative to the directory descriptor
// of its root and resolved with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV);
// files are opened O_NOFOLLOW, new ones O_EXCL, and only regular files are read or overwritten, in
// bounded chunks. Nothing a pod planted in the volume (a symlink, a FIFO, a huge sparse file, a
// directory where a link should be) can make the driver write, chmod or read outside the volume,
// block, or allocate more than the volume's size limit.
type Volume struct {
	fd     int
	path   string
	limit  int64 // most bytes of files delivered or read
	fsSize int64 // the tmpfs's size: no file can hold more data, so no scrub writes more
}

// Open opens the volume mounted at target (the last component is not followed) and checks that it
// is a tmpfs. limit is the most bytes of files it delivers or reads (the volume's sizeLimit).
func Open(target string, limit int64) (*Volume, error) {
	fd, err := unix.Open(target, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", target, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil || st.Type != Magic {
		unix.Close(fd)
		if err == nil {
			err = errors.New("not a tmpfs")
		}
		return nil, fmt.Errorf("volume %s: %w", target, err)
	}
	return &Volume{fd: fd, path: target, limit: limit, fsSize: int64(st.Blocks) * st.Bsize}, nil
}

// Close closes the volume's directory descriptor.
func (v *Volume) Close() error { return unix.Close(v.fd) }

func openIn(dirfd int, name string, flags int, mode uint32) (int, error) {
	for again := 0; ; {
		fd, err := unix.Openat2(dirfd, name, &unix.OpenHow{
			Flags: uint64(flags | unix.O_NOFOLLOW | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolve,
		})
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN && again < 3:
			// A RESOLVE_BENEATH lookup raced with a rename: retry a few times. EAGAIN is also what an
			// O_NONBLOCK open answers while someone holds a lease on the file: that is not waited for.
			again++
			continue
		}
		return fd, err
	}
}

// MaxVersionSize bounds VersionFile, written and read back.
const MaxVersionSize = 64 << 10

// deliverable reports whether name is one the driver delivers: a valid file name or VersionFile.
func deliverable(name string) bool { return name == VersionFile || ValidName(name) }

// ValidName reports whether name can be a delivered file: one path component, not starting with
// "..", not "." .
func ValidName(name string) bool {
	return name != "" && name != "." && len(name) <= 255 && !strings.ContainsAny(name, "/\x00") && !strings.HasPrefix(name, "..")
}

func isPayloadName(name string) bool {
	// "..2006_01_02_15_04_05.<16 hex>"
	rest, ok := strings.CutPrefix(name, "..")
	if !ok || len(rest) != len("2006_01_02_15_04_05.")+16 {
		return false
	}
	_, err := time.Parse("2006_01_02_15_04_05", rest[:19])
	return err == nil && rest[19] == '.' && isHex(rest[20:])
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

// entry is one name in the volume's root, as readdir reports it (no link is followed).
type entry struct {
	name string
	typ  os.FileMode
}

func (v *Volume) list() ([]entry, error) {
	fd, err := openIn(v.fd, ".", unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("list volume: %w", err)
	}
	f := os.NewFile(uintptr(fd), v.path)
	defer f.Close()
	des, err := f.ReadDir(-1)
	if err != nil {
		return nil, fmt.Errorf("list volume: %w", err)
	}
	out := make([]entry, len(des))
	for i, d := range des {
		out[i] = entry{d.Name(), d.Type()}
	}
	return out, nil
}

// delivered returns the names the driver delivered: the root's symlinks of the driver's own shape,
// name -> ..data/name. They are the driver's payload list; a volume holds nothing else of its own.
func (v *Volume) delivered(entries []entry) []string {
	var names []string
	for _, e := range entries {
		if e.typ != os.ModeSymlink || !deliverable(e.name) {
			continue
		}
		if t, err := readlinkAt(v.fd, e.name); err == nil && t == dataLink+"/"+e.name {
			names = append(names, e.name)
		}
	}
	return names
}

func readlinkAt(dirfd int, name string) (string, error) {
	buf := make([]byte, 512) // "..data/" and a 255-byte name fit
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		return "", err
	}
	if n == len(buf) {
		return "", errors.New("link target too long")
	}
	return string(buf[:n]), nil
}

// Current returns the payload directory "..data" points to, if it is a link of the driver's shape:
// it names the set of files in force (a new name at every swap).
func (v *Volume) Current() (string, bool) {
	t, err := readlinkAt(v.fd, dataLink)
	return t, err == nil && isPayloadName(t)
}

// newPayloadName returns "..<UTC time>.<16 random hex>": unpredictable, so nothing can be planted at
// it before the driver creates it.
func newPayloadName() string {
	b := make([]byte, 8)
	rand.Read(b)
	return ".." + time.Now().UTC().Format("2006_01_02_15_04_05") + "." + hex.EncodeToString(b)
}

// Swap replaces the delivered files all at once, as kubelet's AtomicWriter does: the files go into a
// new payload directory (random name, mode 0700 until complete), the "..data" link is swapped to it
// with one rename, and each visible name is a link through "..data". A reader sees the old set or
// the new set, never a mix or a partial file. Names no longer delivered disappear. The payload just
// replaced stays until the next swap (a reader that resolved "..data" a moment ago may still be
// opening a file in it); every other payload is scrubbed and removed before the new one is written,
// so a volume never holds more than two sets (see SizeFor). gid, if >= 0, owns the files (the pod's
// fsGroup) and dirMode is the payload directory's final mode.
func (v *Volume) Swap(files []File, gid int, dirMode os.FileMode) error {
	names, err := v.check(files)
	if err != nil {
		return err
	}
	before, err := v.list()
	if err != nil {
		return err
	}
	prevNames := v.delivered(before)
	scrubNames := sortedKeys(names)
	for _, n := range prevNames {
		if !names[n] {
			scrubNames = append(scrubNames, n)
		}
	}
	replaced, _ := v.Current()
	var leftover error
	for _, e := range before {
		if e.typ == os.ModeDir && isPayloadName(e.name) && e.name != replaced {
			leftover = errors.Join(leftover, v.removePayload(e.name, scrubNames))
		}
	}
	payload, err := v.writePayload(files, gid, dirMode)
	if err != nil {
		return err
	}
	if err := v.swapTo(payload); err != nil {
		v.removePayload(payload, sortedKeys(names))
		return err
	}
	if err := v.link(files, prevNames, names); err != nil {
		return err
	}
	if leftover != nil {
		return fmt.Errorf("%w: %v", ErrScrub, leftover)
	}
	return nil
}

// check validates a set of files for Swap and returns their names.
func (v *Volume) check(files []File) (map[string]bool, error) {
	names := map[string]bool{}
	var total int64
	for _, f := range files {
		if !deliverable(f.Name) || names[f.Name] {
			return nil, fmt.Errorf("file name %q: must be unique, non-empty, without '/' and not start with '..'", f.Name)
		}
		if f.Mode.Perm()&0o222 != 0 || f.Mode&^os.ModePerm != 0 {
			return nil, fmt.Errorf("file %s: mode %v is writable or not a plain permission", f.Name, f.Mode)
		}
		names[f.Name] = true
		if f.Name == VersionFile {
			if len(f.Data) > MaxVersionSize {
				return nil, fmt.Errorf("%s of %d bytes: more than %d", VersionFile, len(f.Data), MaxVersionSize)
			}
			continue // the driver's own, counted apart (see SizeFor)
		}
		total += int64(len(f.Data))
	}
	if total > v.limit {
		return nil, fmt.Errorf("%d bytes do not fit the volume's %d: %w", total, v.limit, unix.ENOSPC)
	}
	return names, nil
}

// writePayload writes files into a new payload directory: random name, mode 0700 until every file
// is written (each O_EXCL, through the directory's descriptor), then dirMode and the group. On
// failure nothing of it is left.
func (v *Volume) writePayload(files []File, gid int, dirMode os.FileMode) (payload string, err error) {
	payload = newPayloadName()
	if err := unix.Mkdirat(v.fd, payload, 0o700); err != nil {
		return "", fmt.Errorf("create payload: %w", err)
	}
	if testHookPayloadCreated != nil {
		testHookPayloadCreated(v.path, payload)
	}
	defer func() {
		if err != nil {
			names := make([]string, len(files))
			for i, f := range files {
				names[i] = f.Name
			}
			v.removePayload(payload, names)
		}
	}()
	pfd, err := openIn(v.fd, payload, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		return "", fmt.Errorf("open payload: %w", err)
	}
	defer unix.Close(pfd)
	for _, f := range files {
		if err := writeNew(pfd, f, gid); err != nil {
			return "", err
		}
	}
	if gid >= 0 {
		if err := unix.Fchown(pfd, -1, gid); err != nil {
			return "", fmt.Errorf("payload group: %w", err)
		}
	}
	if err := unix.Fchmod(pfd, uint32(dirMode.Perm())); err != nil {
		return "", fmt.Errorf("payload mode: %w", err)
	}
	return payload, nil
}

// swapTo points "..data" at payload with one rename.
func (v *Volume) swapTo(payload string) error {
	if err := v.unlinkAny(dataTmpLink); err != nil {
		return err
	}
	if err := unix.Symlinkat(payload, v.fd, dataTmpLink); err != nil {
		return fmt.Errorf("link payload: %w", err)
	}
	if err := unix.Renameat(v.fd, dataTmpLink, v.fd, dataLink); err != nil {
		unix.Unlinkat(v.fd, dataTmpLink, 0)
		return fmt.Errorf("swap payload: %w", err)
	}
	return nil
}

// link makes each delivered name a link through "..data" and removes the names no longer delivered.
func (v *Volume) link(files []File, prevNames []string, names map[string]bool) error {
	for _, f := range files {
		want := dataLink + "/" + f.Name
		if t, err := readlinkAt(v.fd, f.Name); err == nil && t == want {
			continue
		}
		if err := v.unlinkAny(f.Name); err != nil {
			return err
		}
		if err := unix.Symlinkat(want, v.fd, f.Name); err != nil {
			return fmt.Errorf("link %s: %w", f.Name, err)
		}
	}
	for _, name := range prevNames {
		if !names[name] {
			if err := unix.Unlinkat(v.fd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove %s: %w", name, err)
			}
		}
	}
	return nil
}

// writeNew creates one file in a payload directory: O_EXCL (nothing planted is reused), written
// whole, then its group and mode set on the descriptor.
func writeNew(dirfd int, f File, gid int) error {
	fd, err := openIn(dirfd, f.Name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", f.Name, err)
	}
	defer unix.Close(fd)
	for p := 0; p < len(f.Data); {
		n, err := unix.Write(fd, f.Data[p:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", f.Name, err)
		}
		p += n
	}
	if gid >= 0 {
		if err := unix.Fchown(fd, -1, gid); err != nil {
			return fmt.Errorf("group of %s: %w", f.Name, err)
		}
	}
	if err := unix.Fchmod(fd, uint32(f.Mode.Perm())); err != nil {
		return fmt.Errorf("mode of %s: %w", f.Name, err)
	}
	return nil
}

// testHookPayloadCreated, when set by a test, runs right after a payload directory is created: it
// plays a pod racing the driver (planting a link inside it, or swapping it for a link).
var testHookPayloadCreated func(volume, payload string)

// SizeFor is the tmpfs size for a volume of at most data bytes in files: room for two complete sets
// (the one in force and the one swapped in), each file rounded up to whole pages, each with its
// VersionFile.
func SizeFor(data int64, files int) int64 {
	const page = 4096
	return 2*(data+int64(files)*page) + 4*page + 2*(MaxVersionSize+page)
}

// Clear removes every delivered file at once, for a revocation or an unmount: the visible links and
// "..data" go first (readers see no file), then every payload's files are overwritten with zeros and
// removed. An error wrapping ErrScrub means the files are gone but one could not be overwritten.
func (v *Volume) Clear() error {
	entries, err := v.list()
	if err != nil {
		return err
	}
	names := v.delivered(entries)
	var first error
	for _, name := range append([]string{dataLink, dataTmpLink}, names...) {
		if err := v.unlinkAny(name); err != nil && !errors.Is(err, unix.ENOTEMPTY) && first == nil {
			first = err // a non-empty directory there is not the driver's: the unmount takes it
		}
	}
	var leftover error
	for _, e := range entries {
		if e.typ == os.ModeDir && isPayloadName(e.name) {
			leftover = errors.Join(leftover, v.removePayload(e.name, names))
		}
	}
	if first == nil && leftover != nil {
		first = fmt.Errorf("%w: %v", ErrScrub, leftover)
	}
	return first
}

// unlinkAny removes name from the root, whatever it is, without following it: a file or link is
// unlinked, an empty directory removed. A non-empty directory is an error (nothing of ours).
func (v *Volume) unlinkAny(name string) error {
	err := unix.Unlinkat(v.fd, name, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(v.fd, name, unix.AT_REMOVEDIR)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	return nil
}

// removePayload scrubs and unlinks the files of one of the driver's payload directories, then removes
// it. The payload was opened without following anything, was root-only until complete and sits on a
// volume the pod cannot write: what it holds, the driver wrote. The delivered names go first; then
// every other regular file listed in it (names delivered before a rename or a driver restart), at
// most MaxFiles, each opened O_NOFOLLOW and scrubbed in bounded chunks. Anything else is unlinked
// unread; a non-empty subdirectory is left to the unmount.
func (v *Volume) removePayload(payload string, names []string) error {
	pfd, err := openIn(v.fd, payload, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("open payload %s: %w", payload, err)
	}
	defer unix.Close(pfd)
	var first error
	scrub := func(name string) {
		if err := scrubFile(pfd, name, v.fsSize); err != nil && first == nil {
			first = fmt.Errorf("scrub %s: %w", name, err)
		}
	}
	for _, name := range names {
		scrub(name)
	}
	if fd, err := unix.Dup(pfd); err == nil {
		f := os.NewFile(uintptr(fd), payload)
		left, _ := f.ReadDir(MaxFiles)
		f.Close()
		for _, d := range left {
			switch {
			case d.Type().IsRegular():
				scrub(d.Name())
			case d.IsDir():
				unix.Unlinkat(pfd, d.Name(), unix.AT_REMOVEDIR)
			default:
				unix.Unlinkat(pfd, d.Name(), 0)
			}
		}
	}
	if err := unix.Unlinkat(v.fd, payload, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTEMPTY) && first == nil {
		first = fmt.Errorf("remove payload %s: %w", payload, err)
	}
	return first
}

// scrubFile overwrites the data of a regular file with zeros, in fixed-size chunks and only where
// data is allocated (a sparse file's holes hold nothing), never more than limit bytes in all; then it
// truncates and unlinks it. A missing file is fine. A link, a FIFO or a socket (not a file the driver
// wrote) is unlinked unread. A file someone holds a lease on is unlinked without waiting for the
// lease (and reported): the driver never blocks on what a pod holds.
func scrubFile(dirfd int, name string, limit int64) error {
	fd, err := openIn(dirfd, name, unix.O_WRONLY|unix.O_NONBLOCK, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENXIO), errors.Is(err, unix.EISDIR):
		unix.Unlinkat(dirfd, name, 0)
		return nil
	case errors.Is(err, unix.EAGAIN):
		unix.Unlinkat(dirfd, name, 0)
		return fmt.Errorf("held by a lease; unlinked without overwriting: %w", err)
	case err != nil:
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := zeroData(fd, st.Size, limit); err != nil {
			return err
		}
		if err := unix.Ftruncate(fd, 0); err != nil {
			return err
		}
	}
	if err := unix.Unlinkat(dirfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

var zeros = make([]byte, chunk)

// zeroData overwrites the allocated ranges of a file of size bytes, at most limit bytes in all.
func zeroData(fd int, size, limit int64) error {
	var written int64
	off := int64(0)
	for off < size && written < limit {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // no data past off
		}
		if err != nil {
			return err
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		for p := start; p < end && written < limit; {
			n := min(end-p, chunk, limit-written)
			w, err := unix.Pwrite(fd, zeros[:n], p)
			if err != nil {
				return err
			}
			if w == 0 {
				return io.ErrShortWrite
			}
			p += int64(w)
			written += int64(w)
		}
		off = end
	}
	return nil
}

// MaxFiles bounds how many entries are read from a payload directory.
const MaxFiles = 256

// Intact reports whether the volume's layout still is exactly what the driver made for files: each
// visible name a link of the driver's shape, nothing else visible, and the payload in force holding
// exactly these regular files, unlinked elsewhere, owned by root, with these modes, group and sizes.
// It opens no file (metadata only, never following a link), so a lease or a FIFO planted in the
// volume cannot stall it; contents are the caller's to compare (the driver keeps a digest of what it
// delivered). Any doubt answers false, so the caller swaps in a fresh payload.
func (v *Volume) Intact(files []File, gid int) bool {
	payload, ok := v.Current()
	if !ok {
		return false
	}
	entries, err := v.list()
	if err != nil {
		return false
	}
	want := map[string]bool{}
	for _, f := range files {
		want[f.Name] = true
	}
	for _, e := range entries {
		switch {
		case e.name == dataLink || (e.typ == os.ModeDir && isPayloadName(e.name)):
		case e.typ == os.ModeSymlink && want[e.name]:
			if t, err := readlinkAt(v.fd, e.name); err != nil || t != dataLink+"/"+e.name {
				return false
			}
			delete(want, e.name)
		default:
			return false
		}
	}
	if len(want) != 0 {
		return false
	}
	pfd, err := openIn(v.fd, payload, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		return false
	}
	defer unix.Close(pfd)
	if n, err := countEntries(pfd); err != nil || n != len(files) {
		return false
	}
	for _, f := range files {
		var st unix.Stat_t
		if unix.Fstatat(pfd, f.Name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG ||
			st.Nlink != 1 || st.Uid != 0 || os.FileMode(st.Mode&0o7777) != f.Mode.Perm() || st.Size != int64(len(f.Data)) ||
			(gid >= 0 && st.Gid != uint32(gid)) {
			return false
		}
	}
	return true
}

func countEntries(dirfd int) (int, error) {
	fd, err := unix.Dup(dirfd)
	if err != nil {
		return 0, err
	}
	f := os.NewFile(uintptr(fd), "payload")
	defer f.Close()
	names, err := f.Readdirnames(MaxFiles + 1)
	if err == io.EOF {
		err = nil
	}
	return len(names), err
}

// Read returns the delivered files (by the driver's own links), sorted by name, each read in
// chunks and at most the volume's limit in all. It refuses anything that is not a regular file. For
// tests, tools and the demo; the driver itself compares with Unchanged.
func (v *Volume) Read() ([]File, error) {
	payload, ok := v.Current()
	if !ok {
		return nil, nil // nothing delivered (or cleared)
	}
	entries, err := v.list()
	if err != nil {
		return nil, err
	}
	pfd, err := openIn(v.fd, payload, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open payload: %w", err)
	}
	defer unix.Close(pfd)
	var out []File
	budget := min(v.limit, v.fsSize)
	for _, name := range v.delivered(entries) {
		if name == VersionFile {
			continue // the driver's own (ReadVersion)
		}
		fd, err := openIn(pfd, name, unix.O_RDONLY|unix.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", name, err)
		}
		f := os.NewFile(uintptr(fd), name)
		st, err := f.Stat()
		if err == nil && !st.Mode().IsRegular() {
			err = fmt.Errorf("%s is not a regular file", name)
		}
		var b []byte
		if err == nil {
			b, err = io.ReadAll(io.LimitReader(f, budget+1))
			if err == nil && int64(len(b)) > budget {
				err = fmt.Errorf("%s: more than the volume's %d bytes", name, min(v.limit, v.fsSize))
			}
		}
		f.Close()
		if err != nil {
			return nil, err
		}
		budget -= int64(len(b))
		out = append(out, File{Name: name, Mode: st.Mode().Perm(), Data: b})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// ReadVersion returns the VersionFile of the payload in force: a regular file (not followed, opened
// without blocking on a lease), at most MaxVersionSize bytes. nil, nil when there is none (nothing
// delivered, or a payload written without one).
func (v *Volume) ReadVersion() ([]byte, error) {
	payload, ok := v.Current()
	if !ok {
		return nil, nil
	}
	pfd, err := openIn(v.fd, payload, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open payload: %w", err)
	}
	defer unix.Close(pfd)
	fd, err := openIn(pfd, VersionFile, unix.O_RDONLY|unix.O_NONBLOCK, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", VersionFile, err)
	}
	f := os.NewFile(uintptr(fd), VersionFile)
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", VersionFile)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxVersionSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", VersionFile, err)
	}
	if len(b) > MaxVersionSize {
		return nil, fmt.Errorf("%s: more than %d bytes", VersionFile, MaxVersionSize)
	}
	return b, nil
}

// Read opens the volume at target and reads its delivered files (see Volume.Read), at most the
// tmpfs's own size in all.
func Read(target string) ([]File, error) {
	v, err := Open(target, math.MaxInt64)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	return v.Read()
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// MountsUnder lists the mount points at or below root (from /proc/self/mountinfo), deepest first.
func MountsUnder(root string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	root = filepath.Clean(root)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := strings.ReplaceAll(f[4], `\040`, " ")
		if mp == root || strings.HasPrefix(mp, root+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// UnmountAllUnder unmounts (after scrubbing) every mount at or below root: a safety net for tests,
// benchmarks and the demo, never used by the driver on volumes kubelet still owns.
func UnmountAllUnder(root string) error {
	mps, err := MountsUnder(root)
	if err != nil {
		return err
	}
	var first error
	for _, mp := range mps {
		if _, err := Unmount(mp, 16<<20); err != nil {
			if uerr := unix.Unmount(mp, unix.MNT_DETACH); uerr != nil && first == nil {
				first = err
			}
		}
	}
	return first
}
