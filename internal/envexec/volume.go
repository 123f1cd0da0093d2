package envexec

import (
	"errors"
	"io"
	"os"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// The volume's layout, as csi/tmpfs (and kubelet's AtomicWriter) write it: each delivered name is a
// symlink "NAME -> ..data/NAME", and "..data" is a symlink to the payload directory in force,
// swapped with one rename.
const dataLink = "..data"

// MaxValue bounds one variable: the kernel refuses an environment string ("NAME=value" and its NUL)
// longer than MAX_ARG_STRLEN, 32 pages.
const MaxValue = 32*4096 - 1

// maxFiles bounds the files --env-all-prefix takes from a volume (csi/tmpfs.MaxFiles).
const maxFiles = 256

// Snapshot is the variables read from one payload of the volume.
type Snapshot struct {
	// Payload is the payload directory "..data" pointed to: a new name at every swap.
	Payload string
	// Vars are the variables, sorted by name.
	Vars []Var
}

// Var is one variable. Its value is never formatted into a message.
type Var struct {
	Name  string
	File  string
	value string
}

// Environ returns base without the snapshot's names, then the snapshot's variables.
func (s *Snapshot) Environ(base []string) []string {
	ours := map[string]bool{}
	for _, v := range s.Vars {
		ours[v.Name] = true
	}
	out := make([]string, 0, len(base)+len(s.Vars))
	for _, kv := range base {
		name, _, _ := strings.Cut(kv, "=")
		if !ours[name] {
			out = append(out, kv)
		}
	}
	for _, v := range s.Vars {
		out = append(out, v.Name+"="+v.value)
	}
	return out
}

// Changed returns the names whose value differs between s and t (or that only one of them has).
func (s *Snapshot) Changed(t *Snapshot) []string {
	a, b := map[string]string{}, map[string]string{}
	for _, v := range s.Vars {
		a[v.Name] = v.value
	}
	for _, v := range t.Vars {
		b[v.Name] = v.value
	}
	var out []string
	for n, va := range a {
		if vb, ok := b[n]; !ok || va != vb {
			out = append(out, n)
		}
	}
	for n := range b {
		if _, ok := a[n]; !ok {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// Load reads the variables o asks for from the volume at o.From. It refuses (ErrVolume) a path
// that is not a read-only tmpfs (statfs: TMPFS_MAGIC and ST_RDONLY, on the directory itself, not
// followed if it is a link) or holds no "..data" payload. Every file comes from the one payload
// "..data" pointed to before and after the read, so a swap during the read is retried, never
// mixed.
func Load(o *Options) (*Snapshot, error) {
	fd, err := unix.Open(o.From, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fail(ErrVolume, "--from %s: %v: mount the secrets.keyward.dev CSI volume there", o.From, err)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return nil, fail(ErrVolume, "--from %s: statfs: %v", o.From, err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		return nil, fail(ErrVolume, "--from %s is not a tmpfs (file system type %#x): mount the secrets.keyward.dev CSI volume there", o.From, st.Type)
	}
	if st.Flags&unix.ST_RDONLY == 0 {
		return nil, fail(ErrVolume, "--from %s is mounted read-write: mount the secrets volume with readOnly: true", o.From)
	}
	var last error
	for range 5 {
		before, err := readlinkAt(fd, dataLink)
		if err != nil {
			return nil, fail(ErrVolume, "--from %s holds no %s link (%v): not a Keyward secrets volume, or its files were withdrawn", o.From, dataLink, err)
		}
		if !validPayload(before) {
			return nil, fail(ErrVolume, "--from %s: %s points to %q, not a payload directory of the volume", o.From, dataLink, before)
		}
		snap, err := read(fd, before, o)
		after, _ := readlinkAt(fd, dataLink)
		if after == before {
			return snap, err
		}
		last = err // swapped while reading: read the new payload
	}
	if last == nil {
		last = fail(ErrVolume, "--from %s: %s was swapped during each of 5 reads", o.From, dataLink)
	}
	return nil, last
}

func validPayload(name string) bool {
	return strings.HasPrefix(name, "..") && name != ".." && name != dataLink && !strings.ContainsAny(name, "/\x00")
}

// read reads o's variables from the payload directory in dirfd.
func read(dirfd int, payload string, o *Options) (*Snapshot, error) {
	pfd, err := unix.Openat(dirfd, payload, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fail(ErrVolume, "--from %s: opening the payload %s: %v", o.From, payload, err)
	}
	defer unix.Close(pfd)
	var root, pst unix.Stat_t
	if unix.Fstat(dirfd, &root) != nil || unix.Fstat(pfd, &pst) != nil || root.Dev != pst.Dev {
		return nil, fail(ErrVolume, "--from %s: the payload %s is not on the volume's tmpfs", o.From, payload)
	}
	snap := &Snapshot{Payload: payload}
	names := map[string]string{} // variable -> file
	add := func(name, file string) error {
		if prev, ok := names[name]; ok {
			return fail(ErrValue, "--from %s: the files %s and %s both give the variable %s", o.From, prev, file, name)
		}
		names[name] = file
		value, err := readValue(pfd, file, o.From)
		if err != nil {
			return err
		}
		snap.Vars = append(snap.Vars, Var{Name: name, File: file, value: value})
		return nil
	}
	for _, m := range o.Env {
		if err := add(m.Name, m.File); err != nil {
			if errors.Is(err, ErrMissing) && errors.Is(err, os.ErrNotExist) {
				files, _ := list(pfd)
				return nil, fail(ErrMissing, "--env %s=%s: the volume %s has no file %s (it has: %s)", m.Name, m.File, o.From, m.File, strings.Join(files, ", "))
			}
			return nil, err
		}
	}
	if o.AllPrefix != "" {
		files, err := list(pfd)
		if err != nil {
			return nil, fail(ErrVolume, "--from %s: listing the payload: %v", o.From, err)
		}
		for _, f := range files {
			name, ok := PrefixedName(o.AllPrefix, f)
			if !ok {
				return nil, fail(ErrValue, "--env-all-prefix %s: the file %q cannot become a variable name (letters, digits, '_', '-' and '.' only); rename it in the volume's entries or use --env", o.AllPrefix, f)
			}
			if err := add(name, f); err != nil {
				return nil, err
			}
		}
	}
	sort.Slice(snap.Vars, func(i, j int) bool { return snap.Vars[i].Name < snap.Vars[j].Name })
	return snap, nil
}

// notExist wraps ErrMissing and os.ErrNotExist.
type notExist struct{ error }

func (notExist) Is(target error) bool { return target == os.ErrNotExist }
func (e notExist) Unwrap() error      { return e.error }

// readValue reads one file of the payload: a regular file (not followed if a link), at most
// MaxValue bytes, without a NUL byte.
func readValue(pfd int, file, from string) (string, error) {
	fd, err := unix.Openat(pfd, file, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return "", notExist{fail(ErrMissing, "the volume %s has no file %s", from, file)}
	case errors.Is(err, unix.EACCES):
		return "", fail(ErrMissing, "cannot read %s in %s: permission denied (give the pod an fsGroup: the volume's files are then group-readable)", file, from)
	case err != nil:
		return "", fail(ErrMissing, "cannot read %s in %s: %v", file, from, err)
	}
	f := os.NewFile(uintptr(fd), file)
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fail(ErrMissing, "cannot read %s in %s: %v", file, from, err)
	}
	if !st.Mode().IsRegular() {
		return "", fail(ErrMissing, "%s in %s is not a regular file", file, from)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxValue+1))
	if err != nil {
		return "", fail(ErrMissing, "cannot read %s in %s: %v", file, from, err)
	}
	if len(b) > MaxValue {
		return "", fail(ErrValue, "%s in %s holds more than %d bytes: too large for an environment variable", file, from, MaxValue)
	}
	if slices.Contains(b, 0) {
		return "", fail(ErrValue, "%s in %s holds a NUL byte: it cannot be an environment variable's value", file, from)
	}
	return string(b), nil
}

// list returns the payload's file names, sorted, at most maxFiles.
func list(pfd int) ([]string, error) {
	fd, err := unix.Dup(pfd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "payload")
	defer f.Close()
	all, err := f.Readdirnames(maxFiles + 2)
	if err != nil && err != io.EOF {
		return nil, err
	}
	names := all[:0]
	for _, n := range all {
		if !strings.HasPrefix(n, "..") { // the broker's own ..version: no delivered file starts so
			names = append(names, n)
		}
	}
	if len(names) > maxFiles {
		return nil, errors.New("more than 256 files")
	}
	sort.Strings(names)
	return names, nil
}

func readlinkAt(dirfd int, name string) (string, error) {
	buf := make([]byte, 512)
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		return "", err
	}
	if n == len(buf) {
		return "", errors.New("link target too long")
	}
	return string(buf[:n]), nil
}
