package tmpfs

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// VersionFile is written into the payload and linked through "..data" like the delivered files, so
// it swaps with them; Read leaves it out, ReadVersion reads it back (bounded), Intact counts it, and
// Clear removes it. No other ".."-name is accepted.
func TestVersionFileSwapsWithThePayload(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	ver := func(n string) File {
		return File{Name: VersionFile, Mode: 0o444, Data: []byte(`{"version":` + n + "}\n")}
	}
	set := []File{{Name: "db-password", Mode: 0o400, Data: []byte("one")}, ver("1")}
	if err := v.Swap(set, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(filepath.Join(dir, VersionFile)); err != nil || l != dataLink+"/"+VersionFile {
		t.Fatalf("link %q %v", l, err)
	}
	if got, err := v.Read(); err != nil || len(got) != 1 || got[0].Name != "db-password" {
		t.Fatalf("Read %+v %v", got, err)
	}
	if b, err := v.ReadVersion(); err != nil || !bytes.Equal(b, set[1].Data) {
		t.Fatalf("ReadVersion %q %v", b, err)
	}
	if !v.Intact(set, -1) || v.Intact(set[:1], -1) {
		t.Fatal("Intact does not count ..version")
	}
	set2 := []File{{Name: "db-password", Mode: 0o400, Data: []byte("two")}, ver("2")}
	if err := v.Swap(set2, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, VersionFile)); !bytes.Equal(b, set2[1].Data) {
		t.Fatalf("after the swap: %q", b)
	}
	if err := v.Swap([]File{{Name: "x", Mode: 0o400, Data: make([]byte, 1)}, {Name: VersionFile, Mode: 0o444, Data: make([]byte, MaxVersionSize+1)}}, -1, 0o755); err == nil {
		t.Fatal("an oversized ..version was written")
	}
	if err := v.Swap([]File{{Name: "..other", Mode: 0o400}}, -1, 0o755); err == nil {
		t.Fatal("a '..' name other than ..version was written")
	}
	if err := v.Clear(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, VersionFile)); !os.IsNotExist(err) {
		t.Fatalf("Clear left ..version: %v", err)
	}
	if b, err := v.ReadVersion(); b != nil || err != nil {
		t.Fatalf("ReadVersion of a cleared volume: %q %v", b, err)
	}
}
