package archtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/keyward/keyward"

// pkg is one package of the module as go list sees it.
type pkg struct {
	path     string // relative to the module: "broker/vault"
	dir      string
	standard bool
	cgo      bool
	imports  []string // direct, non-test imports
	deps     []string // transitive
}

// list runs go list over patterns.
func list(t *testing.T, patterns ...string) map[string]*pkg {
	t.Helper()
	args := append([]string{"list", "-deps", "-f", "{{.ImportPath}}\t{{.Dir}}\t{{.Standard}}\t{{len .CgoFiles}}\t{{join .Imports \" \"}}\t{{join .Deps \" \"}}"}, patterns...)
	out, err := exec.Command("go", args...).Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	m := map[string]*pkg{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 6 {
			continue
		}
		p := &pkg{path: f[0], dir: f[1], standard: f[2] == "true", cgo: f[3] != "0", imports: strings.Fields(f[4]), deps: strings.Fields(f[5])}
		m[p.path] = p
	}
	return m
}

// own returns the module's own packages, keyed by their path relative to the module.
func own(all map[string]*pkg) map[string]*pkg {
	m := map[string]*pkg{}
	for path, p := range all {
		if rel, ok := strings.CutPrefix(path, module+"/"); ok {
			m[rel] = p
		}
	}
	return m
}

// allowed is what each package may import directly, as its doc.go says: "std" is the standard
// library, other entries are import-path prefixes (module packages relative to the module). Every
// package outside cmd/ and test/ must have an entry, so a new package states its boundaries.
var allowed = map[string][]string{
	"broker":                     {"std", "internal/fault", "internal/audit"},
	"broker/policy":              {"std", "broker", "internal/audit", "internal/fault", "go.uber.org/zap", "sigs.k8s.io/yaml", "k8s.io/apimachinery/", "k8s.io/client-go/"},
	"broker/tokenreview":         {"std", "broker", "internal/fault", "k8s.io/api/", "k8s.io/apimachinery/", "k8s.io/client-go/"},
	"broker/vault":               {"std", "broker", "internal/fault", "github.com/hashicorp/vault/api", "go.uber.org/zap", "golang.org/x/sync/"},
	"csi":                        {"std", "broker", "csi/podevents", "csi/render", "csi/tmpfs", "internal/audit", "internal/fault", "internal/grpcserver", "github.com/container-storage-interface/spec/", "go.uber.org/zap", "golang.org/x/sync/", "google.golang.org/grpc", "google.golang.org/protobuf/types/known/wrapperspb", "sigs.k8s.io/secrets-store-csi-driver/provider/", "sigs.k8s.io/yaml"},
	"csi/podevents":              {"std"},
	"csi/podwatch":               {"std", "k8s.io/apimachinery/", "k8s.io/client-go/"},
	"csi/podevents/restsink":     {"std", "csi/podevents", "k8s.io/apimachinery/", "k8s.io/client-go/rest"},
	"csi/render":                 {"std", "internal/fault", "software.sslmate.com/src/go-pkcs12"},
	"csi/registration":           {"std", "internal/grpcserver", "go.uber.org/zap", "google.golang.org/grpc", "k8s.io/kubelet/pkg/apis/pluginregistration/v1"},
	"csi/tmpfs":                  {"std", "golang.org/x/sys/unix"},
	"internal":                   {"std"},
	"internal/archtest":          {"std"},
	"internal/audit":             {"std", "internal/fault"},
	"internal/config":            {"std", "sigs.k8s.io/yaml"},
	"internal/daemon":            {"std", "go.uber.org/zap", "internal/logging", "internal/version"},
	"internal/envexec":           {"std", "golang.org/x/sys/unix"},
	"internal/fault":             {"std"},
	"internal/grpcserver":        {"std", "internal/fault", "go.uber.org/zap", "google.golang.org/grpc"},
	"internal/hardening":         {"std", "golang.org/x/sys/unix"},
	"internal/logging":           {"std", "go.uber.org/zap"},
	"internal/metricsserver":     {"std"},
	"internal/version":           {"std"},
	"kms":                        {"std"},
	"kms/coverage":               {"std", "kms/envelope", "go.etcd.io/etcd/client/v3"},
	"kms/envelope":               {"std", "internal/fault", "google.golang.org/protobuf/encoding/protowire"},
	"kms/kmstest":                {"std", "kms", "internal/fault"},
	"kms/pkcs11":                 {"std", "kms", "internal/fault", "internal/config", "go.uber.org/zap", "github.com/miekg/pkcs11"},
	"kms/plugin":                 {"std", "kms", "internal/audit", "internal/fault", "internal/grpcserver", "go.uber.org/zap", "google.golang.org/grpc", "github.com/prometheus/client_golang/", "k8s.io/kms/"},
	"proto":                      {"std"},
	"proto/keyward/audit/v1":     {"std", "google.golang.org/protobuf/", "google.golang.org/grpc"},
	"proto/keyward/admin/v1":     {"std", "google.golang.org/protobuf/", "google.golang.org/grpc"},
	"internal/apiserver/apitest": {"std"},
	"internal/apiserver":         {"std", "internal/audit", "internal/fault", "internal/grpcserver", "proto/keyward/audit/v1", "proto/keyward/admin/v1", "go.uber.org/zap", "google.golang.org/grpc", "google.golang.org/protobuf/"},
}

func wiring(rel string) bool {
	return strings.HasPrefix(rel, "cmd/") || strings.HasPrefix(rel, "test/")
}

// Every package's direct imports stay inside what its doc.go allows.
func TestImportsStayInsideEachPackagesBoundary(t *testing.T) {
	all := list(t, "./../../...")
	for rel, p := range own(all) {
		if wiring(rel) {
			continue
		}
		rules, ok := allowed[rel]
		if !ok {
			t.Errorf("package %s has no import rule here: state what it may import in its doc.go and here", rel)
			continue
		}
		for _, imp := range p.imports {
			if !permitted(all, rules, imp) {
				t.Errorf("%s imports %s, which its doc.go does not allow", rel, imp)
			}
		}
	}
}

func permitted(all map[string]*pkg, rules []string, imp string) bool {
	for _, r := range rules {
		switch {
		case r == "std":
			if p := all[imp]; p != nil && p.standard {
				return true
			}
		case strings.Contains(strings.SplitN(r, "/", 2)[0], "."):
			if imp == r || strings.HasPrefix(imp, r) && (strings.HasSuffix(r, "/") || strings.HasPrefix(imp, r+"/")) {
				return true
			}
		case imp == module+"/"+r:
			return true
		}
	}
	return false
}

// Every package has a doc.go that says what it owns and what it may import.
func TestEveryPackageHasADocGo(t *testing.T) {
	for rel, p := range own(list(t, "./../../...")) {
		b, err := os.ReadFile(filepath.Join(p.dir, "doc.go"))
		if err != nil {
			t.Errorf("%s has no doc.go", rel)
			continue
		}
		if !wiring(rel) && !strings.Contains(string(b), "may import") {
			t.Errorf("%s/doc.go does not say what the package may import", rel)
		}
	}
}

// The shared kernel, the domain, the HSM backend and the envelope codec link no gRPC, Prometheus or
// client-go, transitively: they are what every binary and tool builds on.
func TestKernelLinksNoProtocolStacks(t *testing.T) {
	banned := []string{"google.golang.org/grpc", "github.com/prometheus/", "k8s.io/client-go/", "k8s.io/kms/",
		"github.com/container-storage-interface/"}
	all := list(t, "./../../...")
	for _, rel := range []string{"broker", "internal/fault", "internal/audit", "kms", "kms/pkcs11", "kms/envelope"} {
		for _, d := range all[module+"/"+rel].deps {
			for _, b := range banned {
				if strings.HasPrefix(d, b) {
					t.Errorf("%s depends on %s", rel, d)
				}
			}
		}
	}
}

// k8s.io/kubelet reaches the broker only as its plugin-registration API (generated gRPC code), never
// kubelet's own packages and their dependencies.
func TestBrokerLinksOnlyKubeletsRegistrationAPI(t *testing.T) {
	all := list(t, "./../../cmd/keyward-broker")
	for _, d := range all[module+"/cmd/keyward-broker"].deps {
		if strings.HasPrefix(d, "k8s.io/kubelet/") && d != "k8s.io/kubelet/pkg/apis/pluginregistration/v1" {
			t.Errorf("keyward-broker depends on %s", d)
		}
	}
}

// The broker domain depends on nothing outside the standard library but the shared kernel.
func TestBrokerDomainIsStandardLibraryPlusKernel(t *testing.T) {
	all := list(t, "./../../broker")
	for _, d := range all[module+"/broker"].deps {
		if p := all[d]; p != nil && !p.standard && d != module+"/internal/fault" && d != module+"/internal/audit" {
			t.Errorf("broker depends on %s", d)
		}
	}
}

// Nothing of the broker tree reaches the protocol adapters or the KMS.
func TestBrokerTreeImportsNoAdapters(t *testing.T) {
	banned := []string{module + "/csi", module + "/kms", module + "/proto", "google.golang.org/grpc",
		"github.com/container-storage-interface/", "k8s.io/kms"}
	for rel, p := range own(list(t, "./../../broker/...")) {
		if !strings.HasPrefix(rel, "broker") {
			continue
		}
		for _, d := range p.deps {
			for _, b := range banned {
				if strings.HasPrefix(d, b) {
					t.Errorf("%s depends on %s", rel, d)
				}
			}
		}
	}
}

// The KMS plugin does not depend on the secrets broker: they share only the kernel.
func TestKMSDoesNotDependOnTheBroker(t *testing.T) {
	all := list(t, "./../../kms/...", "./../../cmd/keyward-kms")
	for rel, p := range own(all) {
		if !strings.HasPrefix(rel, "kms") && rel != "cmd/keyward-kms" {
			continue
		}
		for _, d := range p.deps {
			if d == module+"/broker" || strings.HasPrefix(d, module+"/broker/") || strings.HasPrefix(d, module+"/csi") {
				t.Errorf("%s depends on %s", rel, d)
			}
		}
	}
}

// cgo only in kms/pkcs11: no other library package links a non-standard cgo package (the binaries
// and tests that wire the HSM do, through it).
func TestCgoOnlyInThePKCS11Backend(t *testing.T) {
	all := list(t, "./../../...")
	for rel, p := range own(all) {
		if wiring(rel) || rel == "kms/pkcs11" {
			continue
		}
		for _, d := range append([]string{p.path}, p.deps...) {
			if q := all[d]; q != nil && q.cgo && !q.standard {
				t.Errorf("%s links the cgo package %s", rel, d)
			}
		}
	}
}

func TestInternalImportsNoDomainPackages(t *testing.T) {
	for rel, p := range own(list(t, "./../../internal/...")) {
		if !strings.HasPrefix(rel, "internal") {
			continue
		}
		for _, d := range p.deps {
			for _, b := range []string{module + "/broker", module + "/csi", module + "/kms"} {
				if strings.HasPrefix(d, b) {
					t.Errorf("%s depends on %s", rel, d)
				}
			}
		}
	}
}

// The CSI adapter keeps no informers (the broker's policy package owns the one it needs).
func TestCSIDoesNotUseInformers(t *testing.T) {
	for _, d := range list(t, "./../../csi")[module+"/csi"].deps {
		if strings.HasPrefix(d, "k8s.io/client-go/tools/cache") {
			t.Errorf("csi depends on %s", d)
		}
	}
}

// keyward-broker runs on every node: it must not link client-go's typed clientset or its informers,
// whose scheme of every API group cost about 20 MiB of resident memory (binary 87 MB -> 30 MB).
func TestBrokerBinaryLinksNoTypedClientset(t *testing.T) {
	for _, d := range list(t, "./../../cmd/keyward-broker")[module+"/cmd/keyward-broker"].deps {
		if d == "k8s.io/client-go/kubernetes" || strings.HasPrefix(d, "k8s.io/client-go/kubernetes/") ||
			strings.HasPrefix(d, "k8s.io/client-go/informers") {
			t.Errorf("keyward-broker links %s", d)
		}
	}
}
