package envexec

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	canary        = "CANARY-envexec-db-password-5b1e"
	rotatedCanary = "CANARY-envexec-db-password-rotated-90c4"
	apiCanary     = "CANARY-envexec-api-key-77d2"
)

// keyward-env refuses to start, with the documented exit code and a message naming the problem,
// and never a value: not a tmpfs, a writable tmpfs, no "..data", a missing file, a value with a
// NUL byte or too large, a file name --env-all-prefix cannot spell, two files giving one name, a
// program not found or not executable, bad usage.
func TestRefusesToStart(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary, "api-key": apiCanary, "nul": "a\x00" + canary,
		"big": strings.Repeat("x", MaxValue+1)})
	odd := newVolume(t, map[string]string{"db@pass": canary})
	twins := newVolume(t, map[string]string{"db-pass": canary, "db.pass": apiCanary})
	plain := t.TempDir()
	// A read-only tmpfs without the atomic writer's layout.
	bare := filepath.Join(t.TempDir(), "bare")
	os.Mkdir(bare, 0o755)
	if err := unix.Mount("tmpfs", bare, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(bare, unix.MNT_DETACH) })
	os.WriteFile(filepath.Join(bare, "db-password"), []byte(canary), 0o444)
	if err := unix.Mount("", bare, "", unix.MS_REMOUNT|unix.MS_RDONLY, "size=64k"); err != nil {
		t.Fatal(err)
	}
	notExec := filepath.Join(t.TempDir(), "app")
	os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644)

	env := func(from string, more ...string) []string {
		return append([]string{"--from", from}, more...)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"not a tmpfs", env(plain, "--env", "DB=db-password", "--", "APP", "report"), ExitVolume, "is not a tmpfs"},
		{"missing directory", env(plain+"/nope", "--env", "DB=db-password", "--", "APP", "report"), ExitVolume, "no such file"},
		{"writable tmpfs", env(vol.rw, "--env", "DB=db-password", "--", "APP", "report"), ExitVolume, "mounted read-write"},
		{"no ..data", env(bare, "--env", "DB=db-password", "--", "APP", "report"), ExitVolume, "holds no ..data link"},
		{"missing file", env(vol.ro, "--env", "DB=db-passwd", "--", "APP", "report"), ExitMissing, "has no file db-passwd (it has: api-key, big, db-password, nul)"},
		{"NUL byte", env(vol.ro, "--env", "DB=nul", "--", "APP", "report"), ExitValue, "holds a NUL byte"},
		{"too large", env(vol.ro, "--env", "DB=big", "--", "APP", "report"), ExitValue, "more than 131071 bytes"},
		{"all-prefix with a NUL file", env(vol.ro, "--env-all-prefix", "APP_", "--", "APP", "report"), ExitValue, "too large for an environment variable"},
		{"unspellable file name", env(odd.ro, "--env-all-prefix", "APP_", "--", "APP", "report"), ExitValue, `the file "db@pass" cannot become a variable name`},
		{"two files, one name", env(twins.ro, "--env-all-prefix", "APP_", "--", "APP", "report"), ExitValue, "both give the variable APP_DB_PASS"},
		{"invalid name", env(vol.ro, "--env", "DB-PASSWORD=db-password", "--", "APP", "report"), ExitUsage, "not a valid environment variable name"},
		{"no command", env(vol.ro, "--env", "DB=db-password"), ExitUsage, "no program to run"},
		{"program not found", env(vol.ro, "--env", "DB=db-password", "--", "no-such-program-keyward"), ExitNotFound, "not found on PATH"},
		{"program path not found", env(vol.ro, "--env", "DB=db-password", "--", "/no/such/program"), ExitNotFound, "no such file"},
		{"program not executable", env(vol.ro, "--env", "DB=db-password", "--", notExec), ExitNotExecutable, "is not executable"},
		{"supervised, not found", env(vol.ro, "--env", "DB=db-password", "--on-change", "restart", "--", "/no/such/program"), ExitNotFound, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, nil, tc.args...)
			code := p.wait()
			out := p.output()
			if code != tc.code || !strings.Contains(out, tc.want) {
				t.Errorf("exit %d, want %d with %q; output:\n%s", code, tc.code, tc.want, out)
			}
			if strings.Contains(out, "pid=") {
				t.Errorf("the application ran:\n%s", out)
			}
			p.noCanary(canary, apiCanary)
		})
	}
}

// Plain mode: keyward-env execs the program in its place (the PID the test started is the
// application's), found on PATH, with the variables set (an existing one overridden, the others
// kept), and no value in argv or any output.
func TestExecKeepsThePIDAndSetsTheVariables(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary, "api.key": apiCanary})
	binDir := filepath.Dir(os.Args[0])
	p := start(t, []string{"PATH=" + binDir + ":/usr/bin:/bin", "DB_PASSWORD=from-the-pod-spec", "KEPT=kept"},
		"--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--env-all-prefix", "APP_", "--",
		filepath.Base(os.Args[0]), appArg, "report", "DB_PASSWORD", "APP_API_KEY", "APP_DB_PASSWORD", "KEPT", "KEYWARD_UNSET", "APP___VERSION")
	line := p.expect("pid=")
	if code := p.wait(); code != 0 {
		t.Fatalf("exit %d:\n%s", code, p.output())
	}
	if got := field(line, "pid"); got != strconv.Itoa(p.cmd.Process.Pid) {
		t.Errorf("the application's pid is %s, keyward-env's was %d: not exec'd in place", got, p.cmd.Process.Pid)
	}
	for name, want := range map[string]string{"DB_PASSWORD": digest(canary), "APP_DB_PASSWORD": digest(canary),
		"APP_API_KEY": digest(apiCanary), "KEPT": digest("kept"), "KEYWARD_UNSET": "unset",
		"APP___VERSION": "unset"} { // the broker's ..version is not a delivered file
		if got := field(line, name); got != want {
			t.Errorf("%s: %s, want %s (line %q)", name, got, want, line)
		}
	}
	p.noCanary(canary, apiCanary)
}

// Signal mode: after a "..data" swap that changes a file, the application receives the signal
// (and keeps its PID); a swap to the same payload name never happens, and keyward-env says what it
// did on stderr without a value.
func TestSignalModeDeliversTheSignalAfterASwap(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary})
	p := start(t, nil, "--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--on-change", "signal:HUP",
		"--min-interval", "0", "--jitter", "0", "--", "APP", "hold", "DB_PASSWORD")
	first := p.expect("pid=")
	if field(first, "ppid") != strconv.Itoa(p.cmd.Process.Pid) {
		t.Fatalf("the application's parent is %s, want keyward-env (%d)", field(first, "ppid"), p.cmd.Process.Pid)
	}
	vol.swap(t, map[string]string{"db-password": rotatedCanary})
	p.expect("sent SIGHUP to the application")
	p.expect("got SIGHUP")
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	if code := p.wait(); code != 7 {
		t.Errorf("exit %d, want the application's 7:\n%s", code, p.output())
	}
	if n := strings.Count("\n"+p.output(), "\npid="); n != 1 {
		t.Errorf("the application started %d times, want once:\n%s", n, p.output())
	}
	p.noCanary(canary, rotatedCanary)
}

// Restart mode: a swap that changes a variable stops the application (SIGTERM) and starts it
// again with the new value; a swap that leaves the variables as they were restarts nothing; a
// re-read that fails (the file gone after a rotation) keeps the application running and says why.
func TestRestartModeRestartsWithTheNewValue(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary, "other": "1"})
	p := start(t, nil, "--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--on-change", "restart",
		"--min-interval", "0", "--jitter", "0", "--", "APP", "hold", "DB_PASSWORD")
	first := p.expect("pid=")
	if field(first, "DB_PASSWORD") != digest(canary) {
		t.Fatalf("first start: %s", first)
	}
	// Only another file changed: no restart.
	vol.swap(t, map[string]string{"db-password": canary, "other": "2"})
	p.expect("the variables did not: no restart")
	// The file is gone: the application keeps running.
	vol.swap(t, map[string]string{"other": "3"})
	p.expect("reading it failed; the application (pid " + field(first, "pid") + ") keeps running as it is: --env DB_PASSWORD=db-password: the volume " + vol.ro + " has no file db-password (it has: other)")
	// Rotated: restarted with the new value.
	vol.swap(t, map[string]string{"db-password": rotatedCanary, "other": "3"})
	p.expect("restarting the application (pid " + field(first, "pid") + "): DB_PASSWORD changed")
	p.expect("got SIGTERM")
	second := p.expect("pid=")
	if field(second, "DB_PASSWORD") != digest(rotatedCanary) || field(second, "pid") == field(first, "pid") {
		t.Fatalf("after the rotation: %s (before: %s)", second, first)
	}
	if field(second, "ppid") != strconv.Itoa(p.cmd.Process.Pid) {
		t.Errorf("the restarted application's parent is %s, want keyward-env", field(second, "ppid"))
	}
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	if code := p.wait(); code != 7 {
		t.Errorf("exit %d, want 7:\n%s", code, p.output())
	}
	if !strings.Contains(p.output(), "started the application again (pid "+field(second, "pid")+")") {
		t.Errorf("keyward-env did not report the restart:\n%s", p.output())
	}
	if n := strings.Count(p.output(), "got SIGTERM"); n != 2 {
		t.Errorf("%d SIGTERMs, want 2 (the restart's and the stop's):\n%s", n, p.output())
	}
	p.noCanary(canary, rotatedCanary)
}

// The minimum interval holds: with --min-interval 1h a swap right after the start is acted on no
// sooner than an hour after it (keyward-env says when; the test does not wait for it).
func TestMinimumIntervalIsHonored(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary})
	p := start(t, nil, "--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--on-change", "restart",
		"--min-interval", "1h", "--jitter", "0", "--", "APP", "hold", "DB_PASSWORD")
	p.expect("pid=")
	vol.swap(t, map[string]string{"db-password": rotatedCanary})
	line := p.expect("changed; checking it in")
	d := strings.TrimSpace(line[strings.LastIndex(line, " "):])
	if !strings.HasPrefix(d, "59m") && d != "1h0m0s" {
		t.Errorf("acting in %s, want about 1h: %s", d, line)
	}
	// A second swap does not schedule a second action.
	vol.swap(t, map[string]string{"db-password": canary + "x"})
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	if code := p.wait(); code != 7 {
		t.Errorf("exit %d, want 7:\n%s", code, p.output())
	}
	if strings.Count(p.output(), "checking it in") != 1 || strings.Contains(p.output(), "restarting") {
		t.Errorf("output:\n%s", p.output())
	}
	p.noCanary(canary, rotatedCanary)
}

// Supervision forwards every signal it receives to the application and exits with its status:
// the exit code, or 128+N for a signal N.
func TestSupervisionForwardsSignalsAndExitStatus(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary})
	args := func(app ...string) []string {
		return append([]string{"--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--on-change", "signal:USR1", "--", "APP"}, app...)
	}
	p := start(t, nil, args("hold")...)
	p.expect("pid=")
	for _, s := range []syscall.Signal{syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGQUIT, syscall.SIGINT} {
		syscall.Kill(p.cmd.Process.Pid, s)
		p.expect("got " + unix.SignalName(s))
	}
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	p.expect("got SIGTERM")
	if code := p.wait(); code != 7 {
		t.Errorf("exit %d after the application's 7", code)
	}
	for _, tc := range []struct {
		app  []string
		code int
	}{
		{[]string{"exit", "3"}, 3},
		{[]string{"exit", "0"}, 0},
		{[]string{"killself"}, 128 + int(syscall.SIGKILL)},
	} {
		p := start(t, nil, args(tc.app...)...)
		if code := p.wait(); code != tc.code {
			t.Errorf("%v: exit %d, want %d:\n%s", tc.app, code, tc.code, p.output())
		}
	}
}

// Supervision reaps orphans: a grandchild whose parent exited is reparented to keyward-env (as to
// PID 1 in a container; here as a subreaper) and reaped when it exits, never left a zombie.
func TestSupervisionReapsOrphans(t *testing.T) {
	vol := newVolume(t, map[string]string{"db-password": canary})
	p := start(t, nil, "--from", vol.ro, "--env", "DB_PASSWORD=db-password", "--on-change", "restart", "--", "APP", "orphan")
	g, err := strconv.Atoi(field(p.expect("grandchild="), "grandchild"))
	if err != nil {
		t.Fatal(err)
	}
	p.expect("orphaned")
	if ppid := statusField(t, g, "PPid"); ppid != strconv.Itoa(p.cmd.Process.Pid) {
		t.Fatalf("the orphan's parent is %s, want keyward-env (%d)", ppid, p.cmd.Process.Pid)
	}
	p.stdin.Close() // the grandchild reads stdin to EOF, then exits
	for i := 0; ; i++ {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(g) + "/stat")
		if os.IsNotExist(err) {
			break // reaped
		}
		if i > 600 {
			t.Fatalf("the orphan %d is still there: %s", g, b)
		}
		unix.Nanosleep(&unix.Timespec{Nsec: 50e6}, nil)
	}
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	if code := p.wait(); code != 7 {
		t.Errorf("exit %d, want 7:\n%s", code, p.output())
	}
}

func statusField(t *testing.T, pid int, key string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// install copies the running executable into a directory, mode 0555, for the init container.
func TestInstallCopiesItself(t *testing.T) {
	dir := t.TempDir()
	p := start(t, nil, "install", dir)
	if code := p.wait(); code != 0 {
		t.Fatalf("exit %d:\n%s", code, p.output())
	}
	st, err := os.Stat(filepath.Join(dir, "keyward-env"))
	if err != nil || st.Mode().Perm() != 0o555 {
		t.Fatalf("installed: %v, %v", st, err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "keyward-env"))
	want, _ := os.ReadFile(os.Args[0])
	if !bytes.Equal(got, want) {
		t.Error("the installed file is not the executable")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
	p = start(t, nil, "install", filepath.Join(dir, "nope"))
	if code := p.wait(); code != ExitInstall {
		t.Errorf("install into a missing directory: exit %d:\n%s", code, p.output())
	}
	p = start(t, nil, "install")
	if code := p.wait(); code != ExitUsage {
		t.Errorf("install without a directory: exit %d", code)
	}
}
