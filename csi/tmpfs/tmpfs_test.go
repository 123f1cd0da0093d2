package tmpfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyward/keyward/test/harness"
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
	if _, err := Mount(dir, MountOptions{Size: SizeFor(1<<20, 8), Mode: 0o750, GID: -1, AllowSwap: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := Unmount(dir, 1<<20); err != nil {
			unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

func openT(t *testing.T, dir string) *Volume {
	t.Helper()
	v, err := Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() }) // Close twice is harmless (EBADF)
	return v
}

func TestMountIsTmpfsAndUnmountScrubs(t *testing.T) {
	dir := mountT(t)
	if ok, err := IsTmpfs(dir); err != nil || !ok {
		t.Fatalf("IsTmpfs = %v, %v", ok, err)
	}
	if ok, _ := IsTmpfs(filepath.Dir(dir)); ok {
		t.Skip("the test's temp dir is itself on tmpfs; cannot tell the mount apart")
	}
	if ok, err := Published(dir); !ok || err != nil {
		t.Fatal("Published = false")
	}
	v := openT(t, dir)
	if err := v.Swap([]File{{Name: "a", Mode: 0o400, Data: []byte("CANARY")}}, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	// Keep a descriptor on the file: after the unmount it still shows what the scrub left in it.
	payload, _ := os.Readlink(filepath.Join(dir, dataLink))
	f, err := os.Open(filepath.Join(dir, payload, "a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Clear(); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 16)
	n, _ := f.ReadAt(b, 0)
	f.Close()
	if bytes.Contains(b[:n], []byte("CANARY")) {
		t.Fatal("the file's content survived the scrub")
	}
	v.Close()
	if scrubErr, err := Unmount(dir, 1<<20); err != nil || scrubErr != nil {
		t.Fatal(err, scrubErr)
	}
	if mp, _ := IsMountPoint(dir); mp {
		t.Fatal("still mounted")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("files left under the mount point after unmount: %v", entries)
	}
	if _, err := Unmount(dir, 1<<20); err != nil {
		t.Fatalf("second unmount: %v", err)
	}
	// noexec, nosuid, nodev are set.
	dir2 := mountT(t)
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mi), "\n") {
		if strings.Contains(l, " "+dir2+" ") {
			for _, opt := range []string{"nosuid", "nodev", "noexec"} {
				if !strings.Contains(l, opt) {
					t.Errorf("mount lacks %s: %s", opt, l)
				}
			}
		}
	}
}

// (Over 60 lines: one volume through a sequence of swaps, each checked.)
func TestSwapReplacesTheWholeSet(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	v1 := []File{{Name: "db-password", Mode: 0o400, Data: []byte("one")}, {Name: "api-key", Mode: 0o440, Data: []byte("k1")}}
	if err := v.Swap(v1, 4242, 0o750); err != nil {
		t.Fatal(err)
	}
	got, err := v.Read()
	if err != nil || len(got) != 2 || string(got[1].Data) != "one" || got[1].Mode != 0o400 || got[0].Mode != 0o440 {
		t.Fatalf("after v1: %+v %v", got, err)
	}
	if !v.Intact(v1, 4242) || v.Intact(v1, 4243) || v.Intact(v1[:1], 4242) {
		t.Fatal("Intact does not tell the set just written from others")
	}
	st, err := os.Stat(filepath.Join(dir, "db-password"))
	if err != nil {
		t.Fatal(err)
	}
	if gid := st.Sys().(*syscall.Stat_t).Gid; gid != 4242 {
		t.Fatalf("group %d, want the fsGroup 4242", gid)
	}
	first, _ := os.Readlink(filepath.Join(dir, dataLink))
	if pst, _ := os.Stat(filepath.Join(dir, first)); pst.Mode().Perm() != 0o750 {
		t.Fatalf("payload mode %v", pst.Mode().Perm())
	}
	v2 := []File{{Name: "db-password", Mode: 0o400, Data: []byte("two")}}
	if err := v.Swap(v2, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	got, _ = v.Read()
	if len(got) != 1 || string(got[0].Data) != "two" {
		t.Fatalf("after v2: %+v", got)
	}
	if _, err := os.Lstat(filepath.Join(dir, "api-key")); !os.IsNotExist(err) {
		t.Fatal("a name no longer delivered is still visible")
	}
	if err := v.Swap([]File{{Name: "db-password", Mode: 0o400, Data: []byte("three")}}, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, first)); !os.IsNotExist(err) {
		t.Fatal("a payload two generations old was not removed")
	}
	if err := v.Clear(); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("clearing left %v", entries)
	}
	if files, err := v.Read(); err != nil || len(files) != 0 {
		t.Fatalf("a cleared volume reads %v, %v", files, err)
	}
	if err := v.Swap(v2, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]File{{{Name: "a/b"}}, {{Name: "..data"}}, {{Name: ""}}, {{Name: "x"}, {Name: "x"}},
		{{Name: "w", Mode: 0o600}}, {{Name: "w", Mode: 0o444 | os.ModeSetuid}}, {{Name: "big", Mode: 0o400, Data: make([]byte, 1<<20+1)}}} {
		if err := v.Swap(bad, -1, 0o755); err == nil {
			t.Fatalf("accepted %+v", bad)
		}
	}
	got, _ = v.Read()
	if len(got) != 1 || !bytes.Equal(got[0].Data, []byte("two")) {
		t.Fatal("a refused write changed the files")
	}
}

// A volume's data may use its whole size limit and still be swapped: the tmpfs holds two sets.
func TestAFullVolumeCanBeSwapped(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	half := bytes.Repeat([]byte("x"), 1<<19)
	for i := range 4 {
		files := []File{{Name: "a", Mode: 0o400, Data: half}, {Name: "b", Mode: 0o400, Data: append(bytes.Clone(half), byte(i))[1:]}}
		if err := v.Swap(files, -1, 0o755); err != nil {
			t.Fatalf("swap %d of a full volume: %v", i, err)
		}
	}
}

// victim is a file and a directory outside the volume, as another pod's volume or the audit log
// would be; check reports whether the driver touched them.
type victim struct {
	dir, file string
	st        os.FileInfo
}

func newVictim(t *testing.T) *victim {
	t.Helper()
	d := filepath.Join(t.TempDir(), "victim")
	os.Mkdir(d, 0o700)
	f := filepath.Join(d, "db-password")
	if err := os.WriteFile(f, []byte("VICTIM-CONTENT"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(f)
	return &victim{dir: d, file: f, st: st}
}

func (v *victim) check(t *testing.T, when string) {
	t.Helper()
	b, err := os.ReadFile(v.file)
	st, _ := os.Stat(v.file)
	if err != nil || string(b) != "VICTIM-CONTENT" || st.Mode() != v.st.Mode() {
		t.Fatalf("%s: the file outside the volume was changed: %q %v %v", when, b, st.Mode(), err)
	}
	if entries, _ := os.ReadDir(v.dir); len(entries) != 1 {
		t.Fatalf("%s: the directory outside the volume holds %v", when, entries)
	}
}

// A pod racing the driver plants a link in the new payload directory, or swaps the directory for a
// link, between its creation and the writes: the driver writes nothing outside the volume.
func TestSwapRacedByAPlantedLink(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	vic := newVictim(t)
	files := []File{{Name: "db-password", Mode: 0o444, Data: []byte("SECRET")}}
	t.Cleanup(func() { testHookPayloadCreated = nil })

	testHookPayloadCreated = func(vol, payload string) {
		os.Symlink(vic.file, filepath.Join(vol, payload, "db-password"))
	}
	if err := v.Swap(files, -1, 0o755); err == nil {
		t.Fatal("a swap into a payload with a planted link succeeded")
	}
	vic.check(t, "link planted in the payload")

	testHookPayloadCreated = func(vol, payload string) {
		p := filepath.Join(vol, payload)
		os.Rename(p, p+"-moved")
		os.Symlink(vic.dir, p)
	}
	v.Swap(files, -1, 0o755) // may fail or succeed: it must not write outside
	vic.check(t, "payload swapped for a link")
	testHookPayloadCreated = nil
	if err := v.Swap(files, -1, 0o755); err != nil {
		t.Fatalf("a clean swap after the attacks: %v", err)
	}
	if got, err := v.Read(); err != nil || len(got) != 1 || string(got[0].Data) != "SECRET" {
		t.Fatalf("after the attacks: %v %v", got, err)
	}
	if err := v.Clear(); err != nil {
		t.Logf("clear: %v", err)
	}
	vic.check(t, "clear")
}

// Links, FIFOs and huge sparse files planted at every name the driver touches: nothing outside the
// volume is read, written or chmodded, nothing blocks, and memory stays bounded.
// (Over 60 lines: most of it is the table of planted objects.)
func TestPlantedObjectsAreNeverFollowed(t *testing.T) {
	files := []File{{Name: "db-password", Mode: 0o400, Data: []byte("SECRET-1")}, {Name: "ca.crt", Mode: 0o444, Data: []byte("CA")}}
	next := []File{{Name: "db-password", Mode: 0o400, Data: []byte("SECRET-2")}, {Name: "ca.crt", Mode: 0o444, Data: []byte("CA")}}
	for name, plant := range map[string]func(t *testing.T, dir, payload string, vic *victim){
		"visible name links outside": func(t *testing.T, dir, _ string, vic *victim) {
			os.Remove(filepath.Join(dir, "db-password"))
			os.Symlink(vic.file, filepath.Join(dir, "db-password"))
		},
		"..data links outside": func(t *testing.T, dir, _ string, vic *victim) {
			os.Remove(filepath.Join(dir, dataLink))
			os.Symlink(vic.dir, filepath.Join(dir, dataLink))
		},
		"..data is a directory": func(t *testing.T, dir, _ string, vic *victim) {
			os.Remove(filepath.Join(dir, dataLink))
			os.Mkdir(filepath.Join(dir, dataLink), 0o755)
		},
		"payload swapped for a link": func(t *testing.T, dir, payload string, vic *victim) {
			os.Rename(filepath.Join(dir, payload), filepath.Join(dir, "moved"))
			os.Symlink(vic.dir, filepath.Join(dir, payload))
		},
		"payload file links outside": func(t *testing.T, dir, payload string, vic *victim) {
			os.Remove(filepath.Join(dir, payload, "db-password"))
			os.Symlink(vic.file, filepath.Join(dir, payload, "db-password"))
		},
		"payload file is a FIFO": func(t *testing.T, dir, payload string, vic *victim) {
			os.Remove(filepath.Join(dir, payload, "db-password"))
			if err := unix.Mkfifo(filepath.Join(dir, payload, "db-password"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"payload file is a 1 TiB sparse file": func(t *testing.T, dir, payload string, vic *victim) {
			if err := os.Truncate(filepath.Join(dir, payload, "db-password"), 1<<40); err != nil {
				t.Fatal(err)
			}
		},
		"visible name is a 1 TiB sparse file": func(t *testing.T, dir, _ string, vic *victim) {
			os.Remove(filepath.Join(dir, "db-password"))
			if err := os.WriteFile(filepath.Join(dir, "db-password"), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			os.Truncate(filepath.Join(dir, "db-password"), 1<<40)
		},
		"a link with a payload's name to a directory outside": func(t *testing.T, dir, payload string, vic *victim) {
			os.Symlink(vic.dir, filepath.Join(dir, newPayloadName()))
		},
		"..data_tmp is a non-empty directory": func(t *testing.T, dir, _ string, vic *victim) {
			os.MkdirAll(filepath.Join(dir, dataTmpLink, "x"), 0o755)
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := mountT(t)
			v := openT(t, dir)
			vic := newVictim(t)
			if err := v.Swap(files, -1, 0o755); err != nil {
				t.Fatal(err)
			}
			if !v.Intact(files, -1) {
				t.Fatal("Intact = false before anything was planted")
			}
			payload, _ := os.Readlink(filepath.Join(dir, dataLink))
			plant(t, dir, payload, vic)
			done := make(chan struct{})
			go func() {
				defer close(done)
				if v.Intact(files, -1) {
					t.Errorf("Intact = true after %s", name)
				}
				v.Read()
				v.Swap(next, -1, 0o755) // may fail (the caller reports Internal and kubelet retries)
				vic.check(t, "swap")
				v.Clear()
				vic.check(t, "clear")
			}()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("the driver blocked on a planted object")
			}
			v.Close()
			if scrubErr, err := Unmount(dir, 1<<20); err != nil {
				t.Fatalf("unmount: %v (scrub: %v): planted objects must not keep a volume mounted", err, scrubErr)
			}
			if ok, _ := Published(dir); ok {
				t.Fatal("still mounted")
			}
			vic.check(t, "unmount")
		})
	}
}

// Scrubbing a 1 TiB sparse file writes only where data is: it returns at once.
func TestScrubOfASparseFileIsBounded(t *testing.T) {
	dir := mountT(t)
	p := filepath.Join(dir, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("CANARY"), 1<<30)
	f.Truncate(1 << 40)
	f.Close()
	d, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(d)
	fd, err := unix.Open(p, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := zeroData(fd, 1<<40, 4<<20); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 6)
	if n, err := unix.Pread(fd, b, 1<<30); n != 6 || err != nil || !bytes.Equal(b, make([]byte, 6)) {
		t.Fatalf("the data was not overwritten: %q %v", b[:n], err)
	}
	if err := scrubFile(d, "sparse", 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(p); !os.IsNotExist(err) {
		t.Fatal("the scrubbed file was not removed")
	}
}

// A file delivered under a name that a later set no longer has is still scrubbed when its payload
// goes (it is not visible any more, but it is the driver's).
func TestRenamedFilesAreScrubbedToo(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	keep := map[string]*os.File{}
	for _, name := range []string{"a", "b", "c"} {
		if err := v.Swap([]File{{Name: name, Mode: 0o400, Data: []byte("SECRET-" + name)}}, -1, 0o755); err != nil {
			t.Fatal(err)
		}
		payload, _ := v.Current()
		f, err := os.Open(filepath.Join(dir, payload, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		keep[name] = f
	}
	if err := v.Clear(); err != nil {
		t.Fatal(err)
	}
	for name, f := range keep {
		b := make([]byte, 16)
		n, _ := f.ReadAt(b, 0)
		if bytes.Contains(b[:n], []byte("SECRET")) {
			t.Fatalf("%s was not overwritten", name)
		}
	}
}

// Names up to 255 bytes are delivered, recognized as the driver's and cleared.
func TestLongNames(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	name := strings.Repeat("n", 255)
	if err := v.Swap([]File{{Name: name, Mode: 0o400, Data: []byte("x")}}, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := v.Read(); err != nil || len(got) != 1 || got[0].Name != name {
		t.Fatalf("read %d files, %v", len(got), err)
	}
	if err := v.Clear(); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("clear left %d entries", len(entries))
	}
}

// A pod holding a lease on a delivered file (fcntl F_SETLEASE works on a read-only mount) cannot
// stall the driver: swaps and clears go on at once, reporting the file they could not overwrite.
func TestALeaseDoesNotStallTheDriver(t *testing.T) {
	dir := mountT(t)
	v := openT(t, dir)
	if err := v.Swap([]File{{Name: "a", Mode: 0o400, Data: []byte("one")}}, -1, 0o755); err != nil {
		t.Fatal(err)
	}
	payload, _ := v.Current()
	f, err := os.Open(filepath.Join(dir, payload, "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
		t.Fatalf("taking a read lease: %v", err)
	}
	harness.Within(t, 10*time.Second, "the driver waited for a pod's lease", func() error {
		// Two swaps: the second removes the leased file's payload.
		for i := range 2 {
			if err := v.Swap([]File{{Name: "a", Mode: 0o400, Data: []byte{byte('2' + i)}}}, -1, 0o755); err != nil && !errors.Is(err, ErrScrub) {
				return err
			}
		}
		if err := v.Clear(); err != nil && !errors.Is(err, ErrScrub) {
			return err
		}
		return nil
	})
}
