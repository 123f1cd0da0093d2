package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	tmpfsMagic = 0x01021994 // TMPFS_MAGIC, linux/magic.h
	stRdonly   = 0x1        // ST_RDONLY, statfs f_flags
	// maxTerminationMessage is kubelet's limit on a container's termination message.
	maxTerminationMessage = 4096
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// expectations are the -expect NAME=VALUE flags.
type expectations map[string]string

func (e expectations) String() string { return fmt.Sprint(len(e)) }

func (e expectations) Set(s string) error {
	name, value, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", s)
	}
	e[name] = value
	return nil
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("secretcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "the secrets volume's mount path (required)")
	want := expectations{}
	fs.Var(want, "expect", "NAME=VALUE: the file NAME in -dir holds exactly VALUE (repeatable)")
	wantEnv := expectations{}
	fs.Var(wantEnv, "expect-env", "VAR=FILE: the environment variable VAR holds exactly the content of the file FILE in -dir (repeatable; no value in argv)")
	termLog := fs.String("termination-log", "/dev/termination-log", "where the verdict is written for the pod's status")
	mountinfo := fs.String("mountinfo", "/proc/self/mountinfo", "the mount table to read")
	timeout := fs.Duration("timeout", 0, "keep checking until the verdict passes or this much time has passed")
	poll := fs.Duration("poll", time.Second, "the interval between checks under -timeout")
	hold := fs.Bool("hold", false, "after the verdict, keep running until SIGTERM or SIGINT")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "secretcheck: -dir is required and no arguments are taken")
		return 2
	}
	deadline := time.Now().Add(*timeout)
	var v verdict
	for {
		v = check(*dir, *mountinfo, want)
		checkEnv(&v, *dir, wantEnv)
		line, _ := json.Marshal(v)
		fmt.Fprintf(stdout, "%s\n", line)
		if len(line) > maxTerminationMessage {
			line = line[:maxTerminationMessage]
		}
		if err := os.WriteFile(*termLog, line, 0o644); err != nil {
			fmt.Fprintln(stderr, "secretcheck: writing the termination log:", err)
		}
		if v.Verdict == "pass" || !time.Now().Add(*poll).Before(deadline) {
			break
		}
		time.Sleep(*poll)
	}
	if *hold {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
	}
	if v.Verdict != "pass" {
		return 1
	}
	return 0
}

// verdict is what secretcheck reports: never a file's content.
type verdict struct {
	Verdict    string     `json:"verdict"` // "pass" or "fail"
	Dir        string     `json:"dir"`
	MountPoint bool       `json:"mountPoint"`
	Tmpfs      bool       `json:"tmpfs"`
	ReadOnly   bool       `json:"readOnly"`
	Files      []fileInfo `json:"files"`
	// Pid is secretcheck's process ID (1 when keyward-env exec'd it as the container's first process).
	Pid int `json:"pid"`
	// Env names the -expect-env variables that are set, with their sizes.
	Env      []fileInfo `json:"env,omitempty"`
	Problems []string   `json:"problems,omitempty"`
}

// checkEnv checks each -expect-env VAR=FILE: VAR is set and holds exactly FILE's content.
func checkEnv(v *verdict, dir string, want expectations) {
	v.Pid = os.Getpid()
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		value, ok := os.LookupEnv(name)
		if !ok {
			v.Problems = append(v.Problems, fmt.Sprintf("variable %s is not set", name))
			continue
		}
		v.Env = append(v.Env, fileInfo{Name: name, Bytes: len(value)})
		b, err := os.ReadFile(filepath.Join(dir, want[name]))
		switch {
		case err != nil:
			v.Problems = append(v.Problems, fmt.Sprintf("expected file %s for variable %s: %v", want[name], name, err))
		case string(b) != value:
			v.Problems = append(v.Problems, fmt.Sprintf("variable %s (%d bytes) does not hold the content of %s (%d bytes)", name, len(value), want[name], len(b)))
		}
	}
	if len(v.Problems) > 0 {
		v.Verdict = "fail"
	}
}

// fileInfo names a file and its size, never anything derived from its content: the termination
// message is in the pod's status, readable by whoever may read the pod, and even a hash of a
// low-entropy secret can be searched offline.
type fileInfo struct {
	Name  string `json:"name"`
	Bytes int    `json:"bytes"`
}

// check inspects dir once.
func check(dir, mountinfoPath string, want expectations) verdict {
	v := verdict{Dir: dir, Files: []fileInfo{}}
	problem := func(format string, a ...any) { v.Problems = append(v.Problems, fmt.Sprintf(format, a...)) }

	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		problem("resolving %s: %v", dir, err)
		v.Verdict = "fail"
		return v
	}
	real = filepath.Clean(real)

	var st syscall.Statfs_t
	statTmpfs, statRO := false, false
	if err := syscall.Statfs(real, &st); err != nil {
		problem("statfs: %v", err)
	} else {
		statTmpfs = st.Type == tmpfsMagic
		statRO = st.Flags&stRdonly != 0
		if !statTmpfs {
			problem("statfs f_type is %#x, not tmpfs", st.Type)
		}
		if !statRO {
			problem("statfs f_flags lack ST_RDONLY")
		}
	}

	m, err := findMount(mountinfoPath, real)
	switch {
	case err != nil:
		problem("%v", err)
	case m == nil:
		problem("%s is not a mount point", real)
	default:
		v.MountPoint = true
		if m.fstype != "tmpfs" {
			problem("mounted as %s, not tmpfs", m.fstype)
		}
		if !m.option("ro") {
			problem("the mount's options %q lack ro", strings.Join(m.options, ","))
		}
	}

	// access(2) checks the permission bits before the mount's read-only flag: a process the bits
	// deny (the image's user, 65532, on a 0750 root:fsGroup volume) gets EACCES, never EROFS, however
	// the directory is mounted. It can write nothing either way; statfs and mountinfo above are what
	// prove the mount read-only. EROFS is required of a process the bits allow (root).
	accessRO := false
	switch err := syscall.Access(real, 2 /* W_OK */); {
	case errors.Is(err, syscall.EROFS):
		accessRO = true
	case errors.Is(err, syscall.EACCES) && os.Geteuid() != 0:
		accessRO = true
	case err == nil:
		problem("access(W_OK) succeeds: the directory is writable")
	default:
		problem("access(W_OK): %v, want EROFS (or EACCES, not being root)", err)
	}

	v.Tmpfs = statTmpfs && m != nil && m.fstype == "tmpfs"
	v.ReadOnly = statRO && m != nil && m.option("ro") && accessRO

	entries, err := os.ReadDir(real)
	if err != nil {
		problem("reading the directory: %v", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "..") {
			continue // an atomic writer's own entries
		}
		b, err := os.ReadFile(filepath.Join(real, e.Name()))
		if err != nil {
			if !e.IsDir() {
				problem("reading %s: %v", e.Name(), err)
			}
			continue
		}
		v.Files = append(v.Files, fileInfo{Name: e.Name(), Bytes: len(b)})
	}
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(real, name))
		switch {
		case err != nil:
			problem("expected file %s: %v", name, err)
		case string(b) != want[name]:
			problem("file %s does not hold the expected value (%d bytes, want %d)", name, len(b), len(want[name]))
		}
	}
	v.Verdict = "pass"
	if len(v.Problems) > 0 || !v.Tmpfs || !v.ReadOnly || !v.MountPoint {
		v.Verdict = "fail"
	}
	return v
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	point   string
	options []string // the mount's own options (ro/rw, nosuid, ...), not the superblock's
	fstype  string
}

func (m *mount) option(o string) bool {
	for _, x := range m.options {
		if x == o {
			return true
		}
	}
	return false
}

// findMount returns the topmost mount at point (the last one listed), or nil if none is.
func findMount(path, point string) (*mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	mounts, err := parseMountinfo(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var found *mount
	for i := range mounts {
		if mounts[i].point == point {
			found = &mounts[i]
		}
	}
	return found, nil
}

// parseMountinfo reads the format of proc(5)'s /proc/PID/mountinfo:
// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS.
func parseMountinfo(r io.Reader) ([]mount, error) {
	var out []mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 7 || sep < 0 || sep+1 >= len(f) {
			return nil, fmt.Errorf("malformed line %q", sc.Text())
		}
		out = append(out, mount{point: unescape(f[4]), options: strings.Split(f[5], ","), fstype: f[sep+1]})
	}
	return out, sc.Err()
}

// unescape undoes the octal escapes (\040 for a space, ...) of mountinfo's path fields.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
