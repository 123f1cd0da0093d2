package archtest

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/keyward/keyward"

// deps lists the transitive dependencies of pkg with `go list -deps`.
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

func TestBrokerDomainImportsStandardLibraryOnly(t *testing.T) {
	for _, d := range deps(t, module+"/broker") {
		if d == module+"/broker" {
			continue
		}
		// Standard library import paths have no dot in their first element.
		if first, _, _ := strings.Cut(d, "/"); strings.Contains(first, ".") {
			t.Errorf("broker imports %s; the domain package may import the standard library only", d)
		}
	}
}

func TestBrokerTreeImportsNoProtocolPackages(t *testing.T) {
	banned := []string{"google.golang.org/grpc", "github.com/container-storage-interface/", "k8s.io/kms",
		module + "/csi", module + "/kms", module + "/proto"}
	for _, d := range deps(t, "./../../broker/...") {
		for _, b := range banned {
			if strings.HasPrefix(d, b) {
				t.Errorf("a broker package depends on %s", d)
			}
		}
	}
}

func TestInternalImportsNoDomainPackages(t *testing.T) {
	for _, d := range deps(t, "./../../internal/...") {
		for _, b := range []string{module + "/broker", module + "/csi", module + "/kms"} {
			if strings.HasPrefix(d, b) {
				t.Errorf("an internal package depends on %s", d)
			}
		}
	}
}

// keyward-broker runs on every node: it must not link client-go's typed clientset or its informers,
// whose scheme of every API group cost about 20 MiB of resident memory (binary 87 MB -> 30 MB).
func TestBrokerBinaryLinksNoTypedClientset(t *testing.T) {
	for _, d := range deps(t, module+"/cmd/keyward-broker") {
		if d == "k8s.io/client-go/kubernetes" || strings.HasPrefix(d, "k8s.io/client-go/kubernetes/") ||
			strings.HasPrefix(d, "k8s.io/client-go/informers") {
			t.Errorf("keyward-broker links %s", d)
		}
	}
}
