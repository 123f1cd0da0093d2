package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestMain runs secretcheck itself when a test re-executes the test binary as another user.
func TestMain(m *testing.M) {
	if os.Getenv("SECRETCHECK_AS_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func TestParseMountinfo(t *testing.T) {
	in := `22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/a
35 22 0:31 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my\040vol/mount ro,nosuid,nodev,relatime shared:9 master:3 - tmpfs tmpfs rw,size=1024k,mode=750
36 22 0:32 / /plain rw - ext4 /dev/sda1 rw
`
	ms, err := parseMountinfo(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 {
		t.Fatalf("%d mounts, want 3", len(ms))
	}
	m := ms[1]
	if m.point != "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my vol/mount" || m.fstype != "tmpfs" || !m.option("ro") || m.option("rw") {
		t.Errorf("parsed %+v", m)
	}
	// The superblock's "rw" is not the mount's option.
	if ms[2].option("ro") || !ms[2].option("rw") || ms[2].fstype != "ext4" {
		t.Errorf("parsed %+v", ms[2])
	}
	if _, err := parseMountinfo(strings.NewReader("1 2 3\n")); err == nil {
		t.Error("a malformed line parsed")
	}
}

// volume mounts a tmpfs holding files, bind-mounted read-only at another path as kubelet does for a
// readOnly CSI volume; it returns the writable and the read-only mount points.
func volume(t *testing.T, files map[string]string) (rw, ro string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("secretcheck tests mount tmpfs: they need root (the CI machine runs as root)")
	}
	base := t.TempDir()
	rw, ro = filepath.Join(base, "rw"), filepath.Join(base, "ro")
	for _, d := range []string{rw, ro} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount("tmpfs", rw, "tmpfs", 0, "size=1m,mode=0750"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(rw, syscall.MNT_DETACH) })
	for name, v := range files {
		if err := os.WriteFile(filepath.Join(rw, name), []byte(v), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount(rw, ro, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(ro, syscall.MNT_DETACH) })
	if err := syscall.Mount("", ro, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	return rw, ro
}

func TestVerdicts(t *testing.T) {
	rw, ro := volume(t, map[string]string{"password": "s3cr3t", "user": "app"})
	plain := t.TempDir()
	if err := os.WriteFile(filepath.Join(plain, "password"), []byte("s3cr3t"), 0o400); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name                      string
		dir                       string
		want                      expectations
		pass, tmpfs, ro, mountPnt bool
	}{
		{"read-only tmpfs with the expected content", ro, expectations{"password": "s3cr3t"}, true, true, true, true},
		{"read-only tmpfs, no expectations", ro, nil, true, true, true, true},
		{"read-only tmpfs, another value", ro, expectations{"password": "other"}, false, true, true, true},
		{"read-only tmpfs, a missing file", ro, expectations{"token": "x"}, false, true, true, true},
		{"writable tmpfs", rw, expectations{"password": "s3cr3t"}, false, true, false, true},
		{"a plain directory", plain, expectations{"password": "s3cr3t"}, false, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := check(tc.dir, "/proc/self/mountinfo", tc.want)
			if (v.Verdict == "pass") != tc.pass || v.Tmpfs != tc.tmpfs || v.ReadOnly != tc.ro || v.MountPoint != tc.mountPnt {
				t.Errorf("verdict %+v, want pass=%v tmpfs=%v readOnly=%v mountPoint=%v", v, tc.pass, tc.tmpfs, tc.ro, tc.mountPnt)
			}
			if tc.tmpfs && len(v.Files) != 2 {
				t.Errorf("files %+v, want password and user", v.Files)
			}
		})
	}
}

// The verdict reaches stdout and the termination log, never with a file's content; the exit code
// follows it.
func TestRunReportsThroughTheTerminationLog(t *testing.T) {
	_, ro := volume(t, map[string]string{"password": "s3cr3t"})
	termLog := filepath.Join(t.TempDir(), "termination-log")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-dir", ro, "-expect", "password=s3cr3t"}, 0, "pass"},
		{[]string{"-dir", ro, "-expect", "password=nope", "-timeout", "300ms", "-poll", "100ms"}, 1, "fail"},
		{[]string{"-dir", t.TempDir()}, 1, "fail"},
	} {
		var stdout bytes.Buffer
		code := run(append(tc.args, "-termination-log", termLog), &stdout, io.Discard)
		if code != tc.code {
			t.Errorf("%v: exit %d, want %d", tc.args, code, tc.code)
		}
		b, err := os.ReadFile(termLog)
		if err != nil {
			t.Fatal(err)
		}
		var v verdict
		if err := json.Unmarshal(b, &v); err != nil || v.Verdict != tc.want {
			t.Errorf("%v: termination log %q (%v), want verdict %s", tc.args, b, err, tc.want)
		}
		if strings.Contains(stdout.String()+string(b), "s3cr3t") {
			t.Errorf("%v: the secret's value was reported: %s", tc.args, stdout.String())
		}
		// Nor anything derived from it: a hash of a guessable value is the value (the termination
		// message is in the pod's status).
		sum := sha256.Sum256([]byte("s3cr3t"))
		for _, enc := range []string{hex.EncodeToString(sum[:4]), base64.StdEncoding.EncodeToString([]byte("s3cr3t"))} {
			if strings.Contains(stdout.String()+string(b), enc) {
				t.Errorf("%v: the report carries %s, derived from the secret's value", tc.args, enc)
			}
		}
		if tc.want == "fail" && !strings.Contains(stdout.String(), `"verdict":"fail"`) {
			t.Errorf("%v: stdout %q", tc.args, stdout.String())
		}
	}
	if code := run([]string{}, io.Discard, io.Discard); code != 2 {
		t.Errorf("no -dir: exit %d, want 2", code)
	}
}

// As the image's user (65532), on a volume as kubelet and the driver make it for a pod with that
// fsGroup (0750 root:65532, files 0440, bind-mounted read-only), secretcheck passes: access(W_OK)
// answers EACCES there (the kernel checks the permission bits before the mount's read-only flag);
// it failed every such volume before. The same volume writable by that group still fails.
func TestNonRootUserPassesOnAReadOnlyVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts tmpfs and switches users: it needs root (the CI machine runs as root)")
	}
	bin, err := os.MkdirTemp("", "secretcheck-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(bin, "secretcheck")
	if err := os.WriteFile(exe, self, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, mode string
		pass       bool
	}{{"0750", "0750", true}, {"0770 (group-writable), read-only mount", "0770", true}} {
		t.Run(tc.name, func(t *testing.T) {
			base, err := os.MkdirTemp("", "secretcheck-vol-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(base) })
			if err := os.Chmod(base, 0o755); err != nil {
				t.Fatal(err)
			}
			rw, ro := filepath.Join(base, "rw"), filepath.Join(base, "ro")
			for _, d := range []string{rw, ro} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := syscall.Mount("tmpfs", rw, "tmpfs", 0, "size=1m,gid=65532,mode="+tc.mode); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Unmount(rw, syscall.MNT_DETACH) })
			f := filepath.Join(rw, "password")
			if err := os.WriteFile(f, []byte("s3cr3t"), 0o440); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(f, 0, 65532); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mount(rw, ro, "", syscall.MS_BIND, ""); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Unmount(ro, syscall.MNT_DETACH) })
			if err := syscall.Mount("", ro, "", syscall.MS_BIND|syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				dir  string
				pass bool
			}{{ro, tc.pass}, {rw, false}} {
				cmd := exec.Command(exe, "-dir", c.dir, "-expect", "password=s3cr3t", "-termination-log", "/dev/null")
				cmd.Env = append(os.Environ(), "SECRETCHECK_AS_MAIN=1")
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65532, Gid: 65532}}
				out, err := cmd.Output()
				var v verdict
				if jerr := json.Unmarshal(bytes.TrimSpace(out), &v); jerr != nil {
					t.Fatalf("%s: output %q (%v): %v", c.dir, out, err, jerr)
				}
				if (v.Verdict == "pass") != c.pass || (err == nil) != c.pass {
					t.Errorf("%s as uid 65532: verdict %+v (exit %v), want pass=%v", c.dir, v, err, c.pass)
				}
			}
		})
	}
}

// -expect-env VAR=FILE passes when VAR holds exactly FILE's content and fails otherwise (unset,
// another value, no such file), reporting the variable's name and size, never its value; the
// verdict carries secretcheck's PID.
func TestExpectEnv(t *testing.T) {
	_, ro := volume(t, map[string]string{"password": "s3cr3t"})
	termLog := filepath.Join(t.TempDir(), "termination-log")
	for _, tc := range []struct {
		value string // "" unsets it
		file  string
		code  int
		want  string
	}{
		{"s3cr3t", "password", 0, ""},
		{"", "password", 1, "variable SC_TEST_VAR is not set"},
		{"s3cr3T", "password", 1, "variable SC_TEST_VAR (6 bytes) does not hold the content of password (6 bytes)"},
		{"s3cr3t", "token", 1, "expected file token for variable SC_TEST_VAR"},
	} {
		if tc.value == "" {
			os.Unsetenv("SC_TEST_VAR")
		} else {
			t.Setenv("SC_TEST_VAR", tc.value)
		}
		var stdout bytes.Buffer
		code := run([]string{"-dir", ro, "-expect-env", "SC_TEST_VAR=" + tc.file, "-termination-log", termLog}, &stdout, io.Discard)
		var v verdict
		if err := json.Unmarshal(stdout.Bytes(), &v); err != nil {
			t.Fatal(err)
		}
		if code != tc.code || v.Pid != os.Getpid() || (tc.want != "" && !strings.Contains(strings.Join(v.Problems, "; "), tc.want)) {
			t.Errorf("%+v: exit %d, verdict %+v", tc, code, v)
		}
		if tc.value != "" && (len(v.Env) != 1 || v.Env[0].Name != "SC_TEST_VAR" || v.Env[0].Bytes != len(tc.value)) {
			t.Errorf("%+v: env %+v", tc, v.Env)
		}
		if strings.Contains(stdout.String(), "s3cr3") {
			t.Errorf("the value was reported: %s", stdout.String())
		}
	}
}
