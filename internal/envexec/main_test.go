package envexec

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyward/keyward/csi/tmpfs"
)

// appArg marks a run of the test binary as the application keyward-env starts.
const appArg = "envexec-test-app"

// TestMain runs keyward-env (KEYWARD_ENV_TEST_MAIN=1) or the test application (first argument
// appArg) when a test executes the test binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == appArg {
		os.Exit(app(os.Args[2:]))
	}
	if os.Getenv("KEYWARD_ENV_TEST_MAIN") == "1" {
		os.Exit(Main(os.Args[1:], "test", os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func digest(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:8])
}

// app is the test application. "report NAME..." prints "pid=P ppid=Q" and "NAME=<sha prefix of its
// value>|unset" on one line, never a value. Then, by the first word:
//   - report: exit 0
//   - hold: print "got SIGNAL" for each signal; exit 7 on SIGTERM
//   - exit N: exit N
//   - killself: SIGKILL itself
//   - orphan: start a process that starts a grandchild (which waits for stdin's EOF), print
//     "grandchild=PID", let the middle one exit, then hold
func app(args []string) int {
	mode, rest := args[0], args[1:]
	code := 0
	if mode == "exit" {
		code, _ = strconv.Atoi(rest[0])
		rest = rest[1:]
	}
	if mode == "middle" {
		g := exec.Command(os.Args[0], appArg, "grandchild")
		g.Stdin, g.Stdout, g.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := g.Start(); err != nil {
			fmt.Println("error", err)
			return 1
		}
		fmt.Printf("grandchild=%d\n", g.Process.Pid)
		return 0
	}
	if mode == "grandchild" {
		io.Copy(io.Discard, os.Stdin)
		return 0
	}
	var sigs chan os.Signal
	if mode == "hold" || mode == "orphan" {
		sigs = make(chan os.Signal, 16)
		signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGWINCH)
	}
	line := fmt.Sprintf("pid=%d ppid=%d", os.Getpid(), os.Getppid())
	for _, name := range rest {
		v, ok := os.LookupEnv(name)
		if ok {
			line += " " + name + "=" + digest(v)
		} else {
			line += " " + name + "=unset"
		}
	}
	fmt.Println(line)
	switch mode {
	case "killself":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	case "orphan":
		m := exec.Command(os.Args[0], appArg, "middle")
		m.Stdin, m.Stdout, m.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := m.Run(); err != nil {
			fmt.Println("error", err)
			return 1
		}
		fmt.Println("orphaned")
		fallthrough
	case "hold":
		for s := range sigs {
			fmt.Println("got", unix.SignalName(s.(syscall.Signal)))
			if s == syscall.SIGTERM {
				return 7
			}
		}
	}
	return code
}

// volume is a Keyward volume as the broker makes it: a tmpfs written by csi/tmpfs (payload
// directories swapped through "..data"), bind-mounted read-only at ro as kubelet mounts a
// readOnly CSI volume into a container.
type volume struct {
	rw, ro string
	v      *tmpfs.Volume
}

func newVolume(t *testing.T, files map[string]string) *volume {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests mount tmpfs: they need root (the CI machine runs as root)")
	}
	base := t.TempDir()
	vol := &volume{rw: filepath.Join(base, "rw"), ro: filepath.Join(base, "ro")}
	for _, d := range []string{vol.rw, vol.ro} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tmpfs.Mount(vol.rw, tmpfs.MountOptions{Size: 4 << 20, Mode: 0o755, GID: -1, AllowSwap: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(vol.rw, unix.MNT_DETACH) })
	v, err := tmpfs.Open(vol.rw, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	vol.v = v
	vol.swap(t, files)
	if err := unix.Mount(vol.rw, vol.ro, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(vol.ro, unix.MNT_DETACH) })
	if err := unix.Mount("", vol.ro, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	return vol
}

// swap delivers a new set of files with their ..version, as a republish does (--env-all-prefix
// must skip ..version: TestExecKeepsThePIDAndSetsTheVariables).
func (vol *volume) swap(t *testing.T, files map[string]string) {
	t.Helper()
	fs := []tmpfs.File{{Name: tmpfs.VersionFile, Mode: 0o444, Data: []byte(`{"version":1,"refs":{}}` + "\n")}}
	for name, v := range files {
		fs = append(fs, tmpfs.File{Name: name, Mode: 0o444, Data: []byte(v)})
	}
	if err := vol.v.Swap(fs, -1, 0o755); err != nil {
		t.Fatal(err)
	}
}

// proc is a running keyward-env whose output the test reads line by line.
type proc struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // stdout and stderr, merged
	mu    sync.Mutex
	all   strings.Builder
	done  chan struct{}
	code  int
}

// start runs keyward-env with args (the program is the test application: "APP" in args is
// replaced by the test binary and appArg), with extra environment.
func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	var full []string
	for _, a := range args {
		if a == "APP" {
			full = append(full, os.Args[0], appArg)
			continue
		}
		full = append(full, a)
	}
	cmd := exec.Command(os.Args[0], full...)
	cmd.Env = append(append(os.Environ(), "KEYWARD_ENV_TEST_MAIN=1"), env...)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, cmd: cmd, stdin: stdin, lines: make(chan string, 1024), done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	eof := make(chan struct{})
	go func() {
		defer close(eof)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			p.mu.Lock()
			p.all.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			p.lines <- sc.Text()
		}
		r.Close()
	}()
	go func() {
		err := cmd.Wait()
		p.code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			p.code = ee.ExitCode()
			if ws := ee.Sys().(syscall.WaitStatus); ws.Signaled() {
				p.code = 128 + int(ws.Signal())
			}
		} else if err != nil {
			p.code = -1
		}
		<-eof // every line read
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// expect waits for a line containing want (or, for a prefix "re:", any line starting with the
// rest) and returns it. The deadline is a bound on a hang, not a timing assertion.
func (p *proc) expect(want string) string {
	p.t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, want) {
				return l
			}
		case <-deadline:
			p.t.Fatalf("no line with %q; output so far:\n%s", want, p.output())
		}
	}
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all.String()
}

// wait waits for keyward-env to exit and returns its exit code.
func (p *proc) wait() int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		p.t.Fatalf("keyward-env did not exit; output:\n%s", p.output())
	}
	return p.code
}

// noCanary fails if any output carried one of the values.
func (p *proc) noCanary(values ...string) {
	p.t.Helper()
	out := p.output()
	for _, v := range values {
		if strings.Contains(out, v) {
			p.t.Errorf("the output carries a secret value:\n%s", out)
		}
	}
}

func field(line, key string) string {
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			return v
		}
	}
	return ""
}
