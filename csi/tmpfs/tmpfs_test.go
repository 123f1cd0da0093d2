package tmpfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// These tests mount real tmpfs file systems: they need root (the CI machine runs as root, as a CSI
// node plugin does).
func mountT(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("tmpfs tests need root (CSI node plugins run privileged)")
	}
	dir := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if _, err := Mount(dir, 1<<20, 0o750, -1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(dir) })
	return dir
}

func TestMountIsTmpfsAndUnmountScrubs(t *testing.T) {
	dir := mountT(t)
	if ok, err := IsTmpfs(dir); err != nil || !ok {
		t.Fatalf("IsTmpfs = %v, %v", ok, err)
	}
	if ok, _ := IsTmpfs(filepath.Dir(dir)); ok {
		t.Skip("the test's temp dir is itself on tmpfs; cannot tell the mount apart")
	}
	if mp, err := IsMountPoint(dir); err != nil || !mp {
		t.Fatalf("IsMountPoint = %v, %v", mp, err)
	}
	if err := WriteAtomic(dir, []File{{Name: "a", Mode: 0o400, Data: []byte("CANARY")}}, -1); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if mp, _ := IsMountPoint(dir); mp {
		t.Fatal("still mounted")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("files left under the mount point after unmount: %v", entries)
	}
	if err := Unmount(dir); err != nil {
		t.Fatalf("second unmount: %v", err)
	}
	// noexec, nosuid, nodev are set.
	dir2 := mountT(t)
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, " "+dir2+" ") {
			for _, opt := range []string{"nosuid", "nodev", "noexec"} {
				if !strings.Contains(l, opt) {
					t.Errorf("mount lacks %s: %s", opt, l)
				}
			}
		}
	}
}

func TestWriteAtomicSwapsTheWholeSet(t *testing.T) {
	dir := mountT(t)
	v1 := []File{{Name: "db-password", Mode: 0o400, Data: []byte("one")}, {Name: "api-key", Mode: 0o440, Data: []byte("k1")}}
	if err := WriteAtomic(dir, v1, 4242); err != nil {
		t.Fatal(err)
	}
	got, err := Read(dir)
	if err != nil || len(got) != 2 || string(got[1].Data) != "one" || got[1].Mode != 0o400 || got[0].Mode != 0o440 {
		t.Fatalf("after v1: %+v %v", got, err)
	}
	var st os.FileInfo
	if st, err = os.Stat(filepath.Join(dir, "db-password")); err != nil {
		t.Fatal(err)
	}
	if gid := st.Sys().(*syscall.Stat_t).Gid; gid != 4242 {
		t.Fatalf("group %d, want the fsGroup 4242", gid)
	}
	first, _ := os.Readlink(filepath.Join(dir, dataLink))
	v2 := []File{{Name: "db-password", Mode: 0o400, Data: []byte("two")}}
	if err := WriteAtomic(dir, v2, -1); err != nil {
		t.Fatal(err)
	}
	got, _ = Read(dir)
	if len(got) != 1 || string(got[0].Data) != "two" {
		t.Fatalf("after v2: %+v", got)
	}
	if err := WriteAtomic(dir, []File{{Name: "db-password", Mode: 0o400, Data: []byte("three")}}, -1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, first)); !os.IsNotExist(err) {
		t.Fatal("a payload two generations old was not removed")
	}
	if err := WriteAtomic(dir, nil, -1); err != nil {
		t.Fatal(err)
	}
	cur, _ := os.Readlink(filepath.Join(dir, dataLink))
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Fatalf("clearing left %v, want only ..data and its empty payload", entries)
	}
	if inner, _ := os.ReadDir(filepath.Join(dir, cur)); len(inner) != 0 {
		t.Fatalf("the cleared payload holds %v", inner)
	}
	if err := WriteAtomic(dir, v2, -1); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]File{{{Name: "a/b"}}, {{Name: "..data"}}, {{Name: ""}}, {{Name: "x"}, {Name: "x"}}} {
		if err := WriteAtomic(dir, bad, -1); err == nil {
			t.Fatalf("accepted %+v", bad)
		}
	}
	got, _ = Read(dir)
	if len(got) != 1 || !bytes.Equal(got[0].Data, []byte("two")) {
		t.Fatal("a refused write changed the files")
	}
}
