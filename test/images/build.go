package images

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Module is this repository's Go module; its packages are built into the images.
const Module = "github.com/keyward/keyward"

// Meta is what an image says about its origin: the org.opencontainers.image.* labels. Created is
// also every timestamp in the image (config, history, tar entries), so it fixes the digest.
type Meta struct {
	Source   string    // the repository's URL
	Revision string    // the commit
	Version  string    // git describe; also linked into the binaries (internal/version)
	Created  time.Time // SOURCE_DATE_EPOCH, else the commit's time
}

// Options says what Build builds and where.
type Options struct {
	ModuleDir  string   // the module's root (where go.mod is)
	OutDir     string   // NAME/ (an OCI image layout) and NAME.tar (the same, archived) go here
	Images     []string // names from Names(); none: all of them
	Repository string   // the image names' prefix: "keyward" gives keyward/keyward-broker
	Tag        string   // the tag the layouts name (not part of the digest)
	Meta
	// ModuleDeps are PKCS#11 modules whose shared libraries the keyward-kms image carries (not the
	// modules: they are mounted from the host), so that keyward-kms can dlopen them.
	ModuleDeps []string
	Log        io.Writer // progress; nil: none
}

// Result is one built image.
type Result struct {
	Name    string  // keyward-broker
	Ref     string  // keyward/keyward-broker:dev
	Digest  v1.Hash // the manifest's digest: what a registry and containerd show
	Layout  string  // the OCI image layout directory (crane push DIR REF)
	Tar     string  // the layout as a tar (ctr -n k8s.io images import TAR)
	TarSize int64   // bytes of the tar
	Content int64   // bytes of the files in the image, uncompressed
	User    string  // the config's User
}

// spec is one image: the Go packages it carries and how it runs.
type spec struct {
	name        string
	description string
	user        string // uid:gid
	bins        []binary
	libs        bool // carry the shared libraries the binaries (and ModuleDeps) need, and the loader
}

// binary is a main package of this module, installed as /usr/local/bin/BASE.
type binary struct {
	pkg string // relative to the module: cmd/keyward-broker
	cgo bool
}

func (b binary) base() string { return filepath.Base(b.pkg) }

// BinDir is where the binaries go in every image.
const BinDir = "/usr/local/bin"

var catalog = []spec{
	{
		name:        "keyward-broker",
		description: "Keyward's CSI node driver: pod secrets from Vault into read-only tmpfs volumes",
		// Root: the broker mounts tmpfs volumes and bind-propagates them to kubelet (a privileged
		// container); it has no other process in its image to protect.
		user: "0:0",
		bins: []binary{{pkg: "cmd/keyward-broker"}},
	},
	{
		name:        "keyward-kms",
		description: "Keyward's KMS v2 plugin for kube-apiserver: keys in a PKCS#11 HSM",
		// Not root: it needs no privilege, only the files the node gives to uid 65532 (the socket
		// directory, its audit directory, the PIN and audit key files, SoftHSM's tokens).
		user: "65532:65532",
		// keywardctl is in no image: it links the PKCS#11 backend (cgo), so not the static broker's,
		// and at 51 MB it would triple this one; operators run it on the node (make build).
		bins: []binary{{pkg: "cmd/keyward-kms", cgo: true}},
		libs: true,
	},
	{
		name:        "keyward-env",
		description: "Keyward's keyward-env: environment variables from a secrets volume, in memory only; `keyward-env install DIR` copies it into an emptyDir",
		// Not root: its init container only copies the binary into an emptyDir (which kubelet makes
		// writable by all); the application's container runs the copy as the application's user.
		user: "65532:65532",
		bins: []binary{{pkg: "cmd/keyward-env"}},
	},
	{
		name:        "pause",
		description: "Keyward's test sandbox image: waits for SIGTERM or SIGINT",
		user:        "65535:65535",
		bins:        []binary{{pkg: "test/images/pause"}},
	},
	{
		name:        "secretcheck",
		description: "Keyward's test workload: proves a secrets volume is a read-only tmpfs with the expected files",
		user:        "65532:65532",
		bins:        []binary{{pkg: "test/images/secretcheck"}},
	},
}

// Names are the images Build knows, in build order.
func Names() []string {
	var out []string
	for _, s := range catalog {
		out = append(out, s.name)
	}
	return out
}

// Build builds the binaries and the images named in o.Images.
func Build(ctx context.Context, o Options) ([]Result, error) {
	if o.Repository == "" {
		o.Repository = "keyward"
	}
	if o.Tag == "" {
		o.Tag = "dev"
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Created.IsZero() {
		return nil, errors.New("images: Meta.Created is required (it fixes every timestamp)")
	}
	names := o.Images
	if len(names) == 0 {
		names = Names()
	}
	var specs []spec
	for _, n := range names {
		i := slices.IndexFunc(catalog, func(s spec) bool { return s.name == n })
		if i < 0 {
			return nil, fmt.Errorf("images: unknown image %q (known: %s)", n, strings.Join(Names(), ", "))
		}
		specs = append(specs, catalog[i])
	}
	work, err := os.MkdirTemp("", "keyward-images-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}

	var results []Result
	for _, s := range specs {
		var entries []entry
		var elves []string
		for _, b := range s.bins {
			out := filepath.Join(work, s.name, b.base())
			start := time.Now()
			if err := goBuild(ctx, o.ModuleDir, out, b, o.Version); err != nil {
				return nil, err
			}
			fmt.Fprintf(o.Log, "built %s (cgo=%v) in %.1fs\n", b.pkg, b.cgo, time.Since(start).Seconds())
			entries = append(entries, entry{path: BinDir + "/" + b.base(), src: out, mode: 0o755})
			elves = append(elves, out)
		}
		if s.libs {
			libs, err := sharedLibraries(ctx, append(elves, o.ModuleDeps...)...)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.name, err)
			}
			entries = append(entries, libs...)
		}
		img, err := assemble(s, entries, o.Meta)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		ref := o.Repository + "/" + s.name + ":" + o.Tag
		r, err := write(img, o.OutDir, s.name, ref, o.Tag, o.Created)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		for _, e := range entries {
			if e.src != "" {
				if st, err := os.Stat(e.src); err == nil {
					r.Content += st.Size()
				}
			}
		}
		r.User = s.user
		results = append(results, r)
	}
	return results, nil
}

// goBuild builds b reproducibly: -trimpath, no VCS stamp, no symbol table or DWARF, the version
// linked in; static (CGO_ENABLED=0) unless b needs cgo.
func goBuild(ctx context.Context, moduleDir, out string, b binary, version string) error {
	ldflags := "-s -w -X " + Module + "/internal/version.Version=" + version
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-ldflags", ldflags,
		"-o", out, "./"+b.pkg)
	cmd.Dir = moduleDir
	cgo := "0"
	if b.cgo {
		cgo = "1"
	}
	// GOFLAGS from the caller's environment (-race, -cover, ...) would change the binary.
	cmd.Env = append(os.Environ(), "CGO_ENABLED="+cgo, "GOFLAGS=", "GOOS=linux")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", b.pkg, err, stderr.String())
	}
	return nil
}

// DefaultMeta is the tree's own: the commit, `git describe`, and SOURCE_DATE_EPOCH or else the
// commit's time. Outside a git checkout the revision is "unknown" and the time the epoch.
func DefaultMeta(moduleDir string) (Meta, error) {
	m := Meta{Source: "https://github.com/keyward/keyward", Revision: "unknown", Version: "dev", Created: time.Unix(0, 0).UTC()}
	git := func(args ...string) (string, error) {
		cmd := exec.Command("git", args...)
		cmd.Dir = moduleDir
		out, err := cmd.Output()
		return strings.TrimSpace(string(out)), err
	}
	if rev, err := git("rev-parse", "HEAD"); err == nil {
		m.Revision = rev
		if v, err := git("describe", "--tags", "--always", "--dirty"); err == nil {
			m.Version = v
		}
		if ct, err := git("log", "-1", "--format=%ct"); err == nil {
			if sec, err := strconv.ParseInt(ct, 10, 64); err == nil {
				m.Created = time.Unix(sec, 0).UTC()
			}
		}
	}
	if e := os.Getenv("SOURCE_DATE_EPOCH"); e != "" {
		sec, err := strconv.ParseInt(e, 10, 64)
		if err != nil {
			return m, fmt.Errorf("SOURCE_DATE_EPOCH=%q: %w", e, err)
		}
		m.Created = time.Unix(sec, 0).UTC()
	}
	return m, nil
}

// sharedLibraries returns image entries for every shared library the ELF files need (as ldd
// resolves them on this machine) and the dynamic loader, each under the path ldd names, with every
// symlink on the way kept as a symlink (libstdc++.so.6 -> libstdc++.so.6.0.30,
// /lib64/ld-linux-x86-64.so.2 -> the loader). A library ldd cannot find is an error.
func sharedLibraries(ctx context.Context, files ...string) ([]entry, error) {
	seen := map[string]bool{}
	var out []entry
	for _, f := range files {
		cmd := exec.CommandContext(ctx, "ldd", f)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		b, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %v %s", f, err, stderr.String())
		}
		paths, err := parseLdd(string(b))
		if err != nil {
			return nil, fmt.Errorf("ldd %s: %w", f, err)
		}
		for _, p := range paths {
			es, err := chain(p)
			if err != nil {
				return nil, err
			}
			for _, e := range es {
				if !seen[e.path] {
					seen[e.path] = true
					out = append(out, e)
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].path < out[j].path })
	return out, nil
}

// parseLdd returns the absolute paths in ldd's output: "name => /path (addr)" and "/path (addr)";
// the vDSO has none. "name => not found" is an error.
func parseLdd(out string) ([]string, error) {
	var paths []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.Contains(line, "statically linked") {
			continue
		}
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("missing library: %s", line)
		}
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			paths = append(paths, f[2])
		case strings.HasPrefix(f[0], "/"):
			paths = append(paths, f[0])
		}
	}
	return paths, nil
}

// chain follows p's symlinks to the file, returning an entry for each link and for the file.
func chain(p string) ([]entry, error) {
	var out []entry
	for hops := 0; hops < 16; hops++ {
		st, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		switch {
		case st.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return nil, err
			}
			out = append(out, entry{path: p, link: target})
			if !filepath.IsAbs(target) {
				target = filepath.Join(filepath.Dir(p), target)
			}
			p = target
		case st.Mode().IsRegular():
			return append(out, entry{path: p, src: p, mode: int64(st.Mode().Perm() & 0o755)}), nil
		default:
			return nil, fmt.Errorf("%s is neither a file nor a symlink", p)
		}
	}
	return nil, fmt.Errorf("%s: too many symlinks", p)
}

// Platform is the images' platform: this machine's architecture (the cgo image carries its libraries).
func Platform() v1.Platform {
	return v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
}
