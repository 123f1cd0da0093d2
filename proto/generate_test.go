package proto

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyward/keyward/test/harness"
)

// The checked-in generated code is what the pinned generators make of the .proto files: regenerated
// into a temporary directory (test/tools/protogen.sh, as `make proto` runs it) and compared file by
// file, both ways. A missing generator fails the test (make deps builds it); it never skips.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	for _, name := range []string{"protoc-gen-go", "protoc-gen-go-grpc"} {
		if _, err := harness.Binary(name); err != nil {
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	cmd := exec.Command("../test/tools/protogen.sh", out)
	cmd.Env = append(os.Environ(), "KEYWARD_PROTOGEN_NO_BUILD=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("protogen: %v\n%s", err, b)
	}
	fresh := generated(t, out)
	inTree := generated(t, ".")
	if len(fresh) == 0 {
		t.Fatal("the generators made nothing")
	}
	for path, want := range fresh {
		got, ok := inTree[path]
		switch {
		case !ok:
			t.Errorf("%s is not checked in: run make proto", path)
		case !bytes.Equal(got, want):
			t.Errorf("%s is stale (it differs from what the .proto files generate): run make proto", path)
		}
	}
	for path := range inTree {
		if _, ok := fresh[path]; !ok {
			t.Errorf("%s is generated code no .proto file makes any more: remove it", path)
		}
	}
}

// generated reads every generated Go file under dir, keyed by its path relative to dir.
func generated(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".pb.go") {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		m[rel] = b
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}
