package tmpfs

import (
	"errors"
	"fmt"
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

// Mount mounts a tmpfs of at most sizeBytes at target (which must exist) with nodev, nosuid and
// noexec, and noswap where the kernel supports it (Linux 6.4+), so the pages are never written to a
// swap device. mode is the root directory's mode; gid, if >= 0, its group.
func Mount(target string, sizeBytes int64, mode os.FileMode, gid int) (noswap bool, err error) {
	if sizeBytes <= 0 {
		return false, fmt.Errorf("tmpfs size %d: must be positive", sizeBytes)
	}
	data := "size=" + strconv.FormatInt(sizeBytes, 10) + ",mode=" + strconv.FormatUint(uint64(mode.Perm()), 8)
	if gid >= 0 {
		data += ",gid=" + strconv.Itoa(gid)
	}
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID | unix.MS_NOEXEC)
	if err := unix.Mount("tmpfs", target, "tmpfs", flags, data+",noswap"); err == nil {
		return true, nil
	} else if !errors.Is(err, unix.EINVAL) {
		return false, fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	if err := unix.Mount("tmpfs", target, "tmpfs", flags, data); err != nil {
		return false, fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	return false, nil
}

// IsTmpfs reports whether path is on a tmpfs.
func IsTmpfs(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == Magic, nil
}

// IsMountPoint reports whether path is the root of a mount (its device differs from its parent's).
func IsMountPoint(path string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return false, err
	}
	if err := unix.Lstat(filepath.Dir(filepath.Clean(path)), &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino, nil
}

// Unmount overwrites every file under target with zeros, then unmounts it. Missing or already
// unmounted targets are fine (idempotent).
func Unmount(target string) error {
	mp, err := IsMountPoint(target)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !mp {
		return nil
	}
	if err := Scrub(target); err != nil {
		return err
	}
	if err := unix.Unmount(target, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}

// Scrub overwrites the content of every regular file under dir with zeros.
func Scrub(dir string) error {
	return filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if _, err := f.Write(make([]byte, st.Size())); err != nil {
			return err
		}
		return f.Sync()
	})
}

// File is one file to deliver.
type File struct {
	Name string
	Mode os.FileMode
	Data []byte
}

const dataLink = "..data"

// WriteAtomic replaces the visible files in dir all at once, as kubelet's AtomicWriter does: the files
// go into a new hidden payload directory, the "..data" symlink is swapped to it with one rename, and
// each visible name is a symlink through "..data". A reader sees the old set or the new set, never a
// mix or a partial file. Files no longer present are removed; payloads older than the one replaced
// are removed (tmpfs pages are freed, never written to disk). gid, if >= 0, owns the files (fsGroup).
func WriteAtomic(dir string, files []File, gid int) error {
	names := map[string]bool{}
	for _, f := range files {
		if f.Name == "" || strings.ContainsRune(f.Name, '/') || strings.HasPrefix(f.Name, "..") || names[f.Name] {
			return fmt.Errorf("file name %q: must be unique, non-empty, without '/' and not start with '..'", f.Name)
		}
		names[f.Name] = true
	}
	payload, err := os.MkdirTemp(dir, ".."+time.Now().UTC().Format("2006_01_02_15_04_05."))
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			Scrub(payload)
			os.RemoveAll(payload)
		}
	}()
	if err := os.Chmod(payload, 0o755); err != nil {
		return err
	}
	for _, f := range files {
		p := filepath.Join(payload, f.Name)
		if err := os.WriteFile(p, f.Data, f.Mode.Perm()); err != nil {
			return err
		}
		if err := os.Chmod(p, f.Mode.Perm()); err != nil { // WriteFile's mode is masked by the umask
			return err
		}
		if gid >= 0 {
			if err := os.Lchown(p, -1, gid); err != nil {
				return err
			}
		}
	}
	old, _ := os.Readlink(filepath.Join(dir, dataLink))
	tmpLink := filepath.Join(dir, "..data_tmp")
	os.Remove(tmpLink)
	if err := os.Symlink(filepath.Base(payload), tmpLink); err != nil {
		return err
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, dataLink)); err != nil {
		os.Remove(tmpLink)
		return err
	}
	ok = true
	for _, f := range files {
		link := filepath.Join(dir, f.Name)
		if target, err := os.Readlink(link); err == nil && target == filepath.Join(dataLink, f.Name) {
			continue
		}
		os.Remove(link)
		if err := os.Symlink(filepath.Join(dataLink, f.Name), link); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "..") && !names[e.Name()] {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	// Earlier payloads go, except the one just replaced: a reader that resolved "..data" a moment
	// ago may still be opening a file in it. It goes at the next swap. Clearing (no files: access was
	// revoked) removes and scrubs every earlier payload at once.
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, "..") || name == filepath.Base(payload) {
			continue
		}
		if len(files) > 0 && name == old {
			continue
		}
		p := filepath.Join(dir, name)
		if len(files) == 0 {
			Scrub(p)
		}
		if err := os.RemoveAll(p); err != nil {
			return err
		}
	}
	return nil
}

// Read returns the visible files of dir (through the symlinks), sorted by name, for comparisons.
func Read(dir string) ([]File, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []File
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		st, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		out = append(out, File{Name: e.Name(), Mode: st.Mode().Perm(), Data: b})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
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
		if err := Unmount(mp); err != nil && first == nil {
			first = err
		}
	}
	return first
}
