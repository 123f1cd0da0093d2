package harness

import (
	"bufio"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

//go:embed versions.env
var versionsEnv string

// ErrMissing marks a component that is not installed or not built yet.
var ErrMissing = errors.New("component not installed")

// Versions returns the pinned component versions (ETCD_VERSION, KUBE_VERSION, VAULT_VERSION).
func Versions() map[string]string {
	out := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(versionsEnv))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			out[k] = v
		}
	}
	return out
}

// CacheDir is where test/tools caches built binaries: $KEYWARD_CACHE, else $XDG_CACHE_HOME/keyward,
// else ~/.cache/keyward.
func CacheDir() string {
	if d := os.Getenv("KEYWARD_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "keyward")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "keyward-cache")
	}
	return filepath.Join(home, ".cache", "keyward")
}

var binaries = map[string]struct{ versionVar, script string }{
	"etcd":                    {"ETCD_VERSION", "test/tools/build-etcd.sh"},
	"etcdctl":                 {"ETCD_VERSION", "test/tools/build-etcd.sh"},
	"kube-apiserver":          {"KUBE_VERSION", "test/tools/build-kube-apiserver.sh"},
	"vault":                   {"VAULT_VERSION", "test/tools/build-vault.sh"},
	"kubelet":                 {"KUBE_VERSION", "test/tools/build-kubelet.sh"},
	"kube-controller-manager": {"KUBE_VERSION", "test/tools/build-kube-controller-manager.sh"},
	"kube-scheduler":          {"KUBE_VERSION", "test/tools/build-kube-scheduler.sh"},
	"kubectl":                 {"KUBE_VERSION", "test/tools/build-kubectl.sh"},
	"protoc-gen-go":           {"PROTOC_GEN_GO_VERSION", "test/tools/build-protogen.sh"},
	"protoc-gen-go-grpc":      {"PROTOC_GEN_GO_GRPC_VERSION", "test/tools/build-protogen.sh"},
}

// Binary returns the path of a cached component binary, or an error wrapping ErrMissing that names
// the command which builds it.
func Binary(name string) (string, error) {
	b, ok := binaries[name]
	if !ok {
		return "", fmt.Errorf("harness: unknown component %q", name)
	}
	version := Versions()[b.versionVar]
	path := filepath.Join(CacheDir(), "bin", name+"-"+version)
	if st, err := os.Stat(path); err != nil || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("%s %s is not built (looked for %s): run `make deps` or `%s`: %w",
			name, version, path, b.script, ErrMissing)
	}
	return path, nil
}

// SoftHSMModule is the PKCS#11 module of Debian's softhsm2 package.
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

func requireSoftHSM() error {
	for _, f := range []string{SoftHSMModule, "/usr/bin/softhsm2-util"} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("softhsm2 is not installed (%s missing): run `make deps` or `test/tools/install-debs.sh`: %w", f, ErrMissing)
		}
	}
	return nil
}

// nodeRuntime are the Debian packages' programs the real node runs: containerd (with its ctr), runc,
// and the CNI plugins it uses.
var nodeRuntime = []string{"/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc",
	cniBinDir + "/bridge", cniBinDir + "/host-local", cniBinDir + "/loopback"}

// cniBinDir is where Debian's containernetworking-plugins installs the CNI plugins.
const cniBinDir = "/usr/lib/cni"

func requireNodeRuntime() error {
	for _, f := range nodeRuntime {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("the node runtime is not installed (%s missing; Debian's containerd, runc and containernetworking-plugins): run `make deps` or `test/tools/install-debs.sh`: %w", f, ErrMissing)
		}
	}
	return nil
}
