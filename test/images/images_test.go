package images

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// softHSM is Debian's SoftHSM module: the keyward-kms image carries its libraries when it is here.
const softHSM = "/usr/lib/softhsm/libsofthsm2.so"

// users is who each image runs as: root only for the broker, which mounts tmpfs.
var users = map[string]string{
	"keyward-broker": "0:0",
	"keyward-kms":    "65532:65532",
	"keyward-env":    "65532:65532",
	"pause":          "65535:65535",
	"secretcheck":    "65532:65532",
}

var (
	tmpRoot  string
	once     sync.Once
	built    []Result
	buildErr error
)

func TestMain(m *testing.M) {
	var err error
	if tmpRoot, err = os.MkdirTemp("", "keyward-images-test-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(tmpRoot)
	os.Exit(code)
}

func options(t *testing.T, out string) Options {
	t.Helper()
	moduleDir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		ModuleDir: moduleDir, OutDir: out, Tag: "test",
		Meta: Meta{Source: "https://example.test/keyward", Revision: "0123456789abcdef", Version: "v0.0.0-test",
			Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)},
	}
	if _, err := os.Stat(softHSM); err == nil {
		o.ModuleDeps = []string{softHSM}
	}
	return o
}

// images builds every image once per test binary.
func images(t *testing.T) []Result {
	t.Helper()
	once.Do(func() {
		built, buildErr = Build(context.Background(), options(t, filepath.Join(tmpRoot, "first")))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func fileSHA(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Building again from the same tree, binaries and all, gives the same digests and byte-identical tars.
func TestBuildIsReproducible(t *testing.T) {
	first := images(t)
	second, err := Build(context.Background(), options(t, filepath.Join(tmpRoot, "second")))
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != len(Names()) || len(second) != len(first) {
		t.Fatalf("built %d and %d images, want %d", len(first), len(second), len(Names()))
	}
	for i := range first {
		a, b := first[i], second[i]
		if a.Digest != b.Digest {
			t.Errorf("%s: digest %s, then %s", a.Name, a.Digest, b.Digest)
		}
		if fileSHA(t, a.Tar) != fileSHA(t, b.Tar) {
			t.Errorf("%s: the two tars differ", a.Name)
		}
		t.Logf("%s %s tar %d bytes, files %d bytes", a.Ref, a.Digest, a.TarSize, a.Content)
	}
}

// The digest depends on the files' content and the metadata, not on the order they are given in or
// on the build machine's file times and modes.
func TestAssemblyDependsOnlyOnContentAndMeta(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("binary a"), 0o755)
	os.WriteFile(b, []byte("library b"), 0o644)
	s := spec{name: "x", user: "1:1", bins: []binary{{pkg: "cmd/a"}}}
	entries := []entry{
		{path: "/usr/local/bin/a", src: a, mode: 0o755},
		{path: "/lib/x/libb.so.1.0", src: b, mode: 0o644},
		{path: "/lib/x/libb.so.1", link: "libb.so.1.0"},
	}
	m := options(t, "").Meta
	digest := func(entries []entry, m Meta) v1.Hash {
		t.Helper()
		img, err := assemble(s, entries, m)
		if err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	base := digest(entries, m)
	reversed := slices.Clone(entries)
	slices.Reverse(reversed)
	if d := digest(reversed, m); d != base {
		t.Errorf("another entry order: %s, want %s", d, base)
	}
	os.Chtimes(a, time.Now(), time.Now().Add(-time.Hour))
	os.Chmod(b, 0o600)
	if d := digest(entries, m); d != base {
		t.Errorf("other file times and modes on the build machine: %s, want %s", d, base)
	}
	other := m
	other.Revision = "fedcba9876543210"
	if digest(entries, other) == base {
		t.Error("another revision gives the same digest: the label is not in the image")
	}
	other = m
	other.Created = m.Created.Add(time.Second)
	if digest(entries, other) == base {
		t.Error("another creation time gives the same digest")
	}
	os.WriteFile(a, []byte("binary A"), 0o755)
	if digest(entries, m) == base {
		t.Error("another binary gives the same digest")
	}
}

// load reads the built image back from its OCI layout, as crane push does.
func load(t *testing.T, r Result) (v1.Image, v1.Descriptor) {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(r.Layout)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("%s: %d manifests in index.json, want 1", r.Name, len(im.Manifests))
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img, im.Manifests[0]
}

// Each image says where it comes from, runs as its user, and is named for containerd's import.
func TestImageConfig(t *testing.T) {
	m := options(t, "").Meta
	for _, r := range images(t) {
		img, desc := load(t, r)
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{
			LabelSource: m.Source, LabelRevision: m.Revision, LabelVersion: m.Version,
			LabelCreated: "2026-01-02T03:04:05Z", LabelTitle: r.Name,
		}
		for k, v := range want {
			if cf.Config.Labels[k] != v {
				t.Errorf("%s: label %s=%q, want %q", r.Name, k, cf.Config.Labels[k], v)
			}
		}
		if cf.Config.User != users[r.Name] || r.User != users[r.Name] {
			t.Errorf("%s: user %q, want %q", r.Name, cf.Config.User, users[r.Name])
		}
		if !cf.Created.Time.Equal(m.Created) || cf.OS != "linux" || cf.Architecture != Platform().Architecture {
			t.Errorf("%s: created %v, platform %s/%s", r.Name, cf.Created, cf.OS, cf.Architecture)
		}
		for _, h := range cf.History {
			if !h.Created.Time.Equal(m.Created) {
				t.Errorf("%s: history created %v", r.Name, h.Created)
			}
		}
		if len(cf.Config.Entrypoint) != 1 || !strings.HasPrefix(cf.Config.Entrypoint[0], BinDir+"/") {
			t.Errorf("%s: entrypoint %v", r.Name, cf.Config.Entrypoint)
		}
		if mt, _ := img.MediaType(); mt != types.OCIManifestSchema1 {
			t.Errorf("%s: manifest media type %s", r.Name, mt)
		}
		if d, _ := img.Digest(); d != r.Digest || desc.Digest != r.Digest {
			t.Errorf("%s: layout holds %s (index %s), Build said %s", r.Name, d, desc.Digest, r.Digest)
		}
		if got, want := desc.Annotations["io.containerd.image.name"], "docker.io/keyward/"+r.Name+":test"; got != want {
			t.Errorf("%s: io.containerd.image.name %q, want %q", r.Name, got, want)
		}
	}
}

// file is one entry of an image's file system.
type file struct {
	hdr  *tar.Header
	data []byte
}

// filesOf reads the image's layers, checking that every entry is owned by root with the fixed time,
// in sorted order.
func filesOf(t *testing.T, img v1.Image) map[string]file {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	created := options(t, "").Created
	out := map[string]file{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		prev := ""
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(created) ||
				!h.AccessTime.IsZero() || !h.ChangeTime.IsZero() || len(h.PAXRecords) > 0 {
				t.Errorf("%s: owner %d:%d (%q:%q), times %v %v %v, PAX %v", h.Name, h.Uid, h.Gid, h.Uname, h.Gname,
					h.ModTime, h.AccessTime, h.ChangeTime, h.PAXRecords)
			}
			if h.Name <= prev {
				t.Errorf("%s after %s: entries not sorted", h.Name, prev)
			}
			prev = h.Name
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			out["/"+strings.TrimSuffix(h.Name, "/")] = file{hdr: h, data: b}
		}
		rc.Close()
	}
	return out
}

// libDirs are where the loader looks without an ld.so.cache (Debian's multiarch glibc).
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
	"/usr/lib/aarch64-linux-gnu", "/lib", "/usr/lib", "/lib64", "/usr/lib64"}

// resolve follows p's symlinks inside the image's files, marking each one used.
func resolve(files map[string]file, p string, used map[string]bool) (string, bool) {
	for hops := 0; hops < 16; hops++ {
		f, ok := files[p]
		if !ok {
			return "", false
		}
		used[p] = true
		if f.hdr.Typeflag != tar.TypeSymlink {
			return p, f.hdr.Typeflag == tar.TypeReg
		}
		if target := f.hdr.Linkname; path.IsAbs(target) {
			p = target
		} else {
			p = path.Join(path.Dir(p), target)
		}
	}
	return "", false
}

// The static images hold their binary and nothing else, and the binary needs no loader; the
// keyward-kms image holds its binary and exactly the libraries and loader they (and the
// SoftHSM module, when the build carried its libraries) need, all found inside the image.
func TestImageContents(t *testing.T) {
	for _, r := range images(t) {
		img, _ := load(t, r)
		files := filesOf(t, img)
		var bins []string
		for p, f := range files {
			if f.hdr.Typeflag == tar.TypeDir {
				if f.hdr.Mode != 0o755 {
					t.Errorf("%s: directory %s has mode %o", r.Name, p, f.hdr.Mode)
				}
				continue
			}
			if path.Dir(p) == BinDir {
				bins = append(bins, p)
			}
		}
		sort.Strings(bins)
		s := catalog[slices.IndexFunc(catalog, func(s spec) bool { return s.name == r.Name })]
		var wantBins []string
		for _, b := range s.bins {
			wantBins = append(wantBins, BinDir+"/"+b.base())
		}
		sort.Strings(wantBins)
		if !slices.Equal(bins, wantBins) {
			t.Errorf("%s: binaries %v, want %v", r.Name, bins, wantBins)
		}
		used := map[string]bool{}
		queue := []string{}
		for _, b := range bins {
			if files[b].hdr.Mode != 0o755 {
				t.Errorf("%s: %s has mode %o", r.Name, b, files[b].hdr.Mode)
			}
			used[b] = true
			queue = append(queue, b)
		}
		var module []byte
		if s.libs {
			if _, err := os.Stat(softHSM); err == nil {
				if module, err = os.ReadFile(softHSM); err != nil {
					t.Fatal(err)
				}
			}
		}
		// Walk DT_NEEDED and PT_INTERP from the binaries (and the module) through the image.
		seen := map[string]bool{}
		check := func(name string, data []byte) []string {
			ef, err := elf.NewFile(bytes.NewReader(data))
			if err != nil {
				t.Errorf("%s: %s is not ELF: %v", r.Name, name, err)
				return nil
			}
			needed, _ := ef.ImportedLibraries()
			var interp string
			for _, p := range ef.Progs {
				if p.Type == elf.PT_INTERP {
					b, _ := io.ReadAll(p.Open())
					interp = strings.TrimRight(string(b), "\x00")
				}
			}
			if !s.libs && (interp != "" || len(needed) > 0) {
				t.Errorf("%s: %s is not static: interpreter %q, needs %v", r.Name, name, interp, needed)
			}
			var next []string
			if interp != "" {
				if p, ok := resolve(files, interp, used); !ok {
					t.Errorf("%s: %s's loader %s is not in the image", r.Name, name, interp)
				} else {
					next = append(next, p)
				}
			}
			for _, lib := range needed {
				found := false
				for _, d := range libDirs {
					if p, ok := resolve(files, d+"/"+lib, used); ok {
						next, found = append(next, p), true
						break
					}
				}
				if !found {
					t.Errorf("%s: %s needs %s, which is not in the image", r.Name, name, lib)
				}
			}
			return next
		}
		if module != nil {
			queue = append(queue, check(softHSM, module)...)
		}
		for len(queue) > 0 {
			p := queue[0]
			queue = queue[1:]
			if seen[p] {
				continue
			}
			seen[p] = true
			queue = append(queue, check(p, files[p].data)...)
		}
		for p, f := range files {
			if f.hdr.Typeflag != tar.TypeDir && !used[p] {
				t.Errorf("%s: %s is in the image but nothing needs it", r.Name, p)
			}
		}
		if s.libs && len(used) <= len(bins)+1 {
			t.Errorf("%s: only %d files used: a cgo image without its libraries?", r.Name, len(used))
		}
	}
}

// extract writes the image's file system under dir.
func extract(t *testing.T, img v1.Image, dir string) {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, os.FileMode(h.Mode).Perm())
		case tar.TypeSymlink:
			err = os.Symlink(h.Linkname, p)
		case tar.TypeReg:
			var b []byte
			if b, err = io.ReadAll(tr); err == nil {
				err = os.WriteFile(p, b, os.FileMode(h.Mode).Perm())
			}
		default:
			err = fmt.Errorf("unexpected entry %s (type %c)", h.Name, h.Typeflag)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// Each image's programs run with nothing but the image's own files, as the image's user: chrooted
// into its extracted file system (no host library can stand in for a missing one).
func TestImagesRunInTheirOwnRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test chroots into the images: it needs root (the CI machine runs as root)")
	}
	type run struct {
		args []string
		code int
		want string
	}
	runs := map[string][]run{
		"keyward-broker": {{[]string{"/usr/local/bin/keyward-broker", "-version"}, 0, "keyward-broker v0.0.0-test"}},
		"keyward-kms": {
			{[]string{"/usr/local/bin/keyward-kms", "-version"}, 0, "keyward-kms v0.0.0-test"},
		},
		"keyward-env": {
			{[]string{"/usr/local/bin/keyward-env", "-version"}, 0, "keyward-env v0.0.0-test"},
			// The init container's job, with no shell and no cp: copy itself into the shared emptyDir
			// (here a directory owned by the image's user, as an emptyDir is writable by all).
			{[]string{"/usr/local/bin/keyward-env", "install", "/keyward/bin"}, 0, "installed /keyward/bin/keyward-env"},
			{[]string{"/keyward/bin/keyward-env", "-version"}, 0, "keyward-env v0.0.0-test"},
			// It refuses a directory that is not a read-only tmpfs (the chroot's /), exit code 3.
			{[]string{"/usr/local/bin/keyward-env", "--from", "/", "--env", "A=a", "--", "keyward-env"}, 3, "is not a tmpfs"},
		},
		"pause":       {{[]string{"/usr/local/bin/pause", "-v"}, 0, "keyward pause"}},
		"secretcheck": {{[]string{"/usr/local/bin/secretcheck"}, 2, "-dir is required"}},
	}
	if _, err := os.Stat(softHSM); err == nil {
		// The PKCS#11 module, mounted from the host as the static pod does, finds its libraries.
		runs["keyward-kms"] = append(runs["keyward-kms"],
			run{[]string{"/lib64/ld-linux-x86-64.so.2", "--list", softHSM}, 0, "libcrypto"})
	}
	for _, r := range images(t) {
		img, _ := load(t, r)
		root := t.TempDir()
		os.Chmod(root, 0o755)
		extract(t, img, root)
		if r.Name == "keyward-kms" {
			if b, err := os.ReadFile(softHSM); err == nil {
				os.MkdirAll(filepath.Join(root, filepath.Dir(softHSM)), 0o755)
				if err := os.WriteFile(filepath.Join(root, softHSM), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		uid, gid := ids(t, users[r.Name])
		if r.Name == "keyward-env" {
			bin := filepath.Join(root, "keyward/bin")
			if err := os.MkdirAll(bin, 0o755); err != nil {
				t.Fatal(err)
			}
			os.Chown(bin, int(uid), int(gid))
		}
		for _, x := range runs[r.Name] {
			cmd := exec.Command(x.args[0], x.args[1:]...)
			cmd.Dir = "/"
			cmd.Env = []string{"PATH=" + BinDir}
			cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root, Credential: &syscall.Credential{Uid: uid, Gid: gid}}
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatalf("%s: %v: %v", r.Name, x.args, err)
			}
			if code != x.code || !strings.Contains(string(out), x.want) || strings.Contains(string(out), "not found") {
				t.Errorf("%s: %v exited %d, want %d, with %q in:\n%s", r.Name, x.args, code, x.code, x.want, out)
			}
		}
	}
}

func ids(t *testing.T, user string) (uint32, uint32) {
	u, g, _ := strings.Cut(user, ":")
	uid, err1 := strconv.ParseUint(u, 10, 32)
	gid, err2 := strconv.ParseUint(g, 10, 32)
	if err1 != nil || err2 != nil {
		t.Fatalf("user %q is not numeric uid:gid", user)
	}
	return uint32(uid), uint32(gid)
}

func TestParseLdd(t *testing.T) {
	out := "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n"
	got, err := parseLdd(out)
	if err != nil || !slices.Equal(got, []string{"/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}) {
		t.Errorf("parseLdd: %v, %v", got, err)
	}
	if _, err := parseLdd("\tlibfoo.so.1 => not found\n"); err == nil {
		t.Error("a missing library parsed")
	}
}
