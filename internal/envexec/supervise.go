package envexec

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// throttle decides when the next action (restart or signal) may happen: at least min after the
// last one (the application's start counts as one), plus a random jitter in [0, jitter).
type throttle struct {
	min, jitter time.Duration
	last        time.Time
	rand        func(time.Duration) time.Duration
}

// at is the time of an action asked for at now.
func (t *throttle) at(now time.Time) time.Time {
	at := t.last.Add(t.min)
	if at.Before(now) {
		at = now
	}
	if t.jitter > 0 {
		at = at.Add(t.rand(t.jitter))
	}
	return at
}

// done records an action at now.
func (t *throttle) done(now time.Time) { t.last = now }

// supervisor runs the application as its child and stays its parent.
type supervisor struct {
	o      *Options
	path   string
	base   []string // keyward-env's environment
	stderr io.Writer
	now    func() time.Time
	load   func(*Options) (*Snapshot, error)

	cur        *Snapshot // what the running child got
	pid        int       // the child, 0 if none
	next       *Snapshot // a restart's environment, while the old child stops
	restarting bool
	stopping   bool // a stop signal came from outside: no more restarts
	thr        throttle
}

func (s *supervisor) logf(format string, a ...any) {
	fmt.Fprintf(s.stderr, "keyward-env: "+format+"\n", a...)
}

// Supervise starts the program as a child with snap's variables and stays as its parent until it
// exits, returning the exit code keyward-env should exit with: the child's, or 128+N if signal N
// killed it. It reaps every child (keyward-env is PID 1 in its container, or else a subreaper),
// forwards every signal it receives to the child (not SIGCHLD; not SIGURG, which the Go runtime
// uses), watches the volume's "..data" link with inotify, and on a change re-reads the volume and,
// at most once per MinInterval plus jitter, restarts the child with the new environment or sends it
// o.Signal. A re-read that fails keeps the child running and says why on stderr.
func Supervise(o *Options, path string, snap *Snapshot, stderr io.Writer) int {
	s := &supervisor{o: o, path: path, base: os.Environ(), stderr: stderr, now: time.Now, load: Load, cur: snap,
		thr: throttle{min: o.MinInterval, jitter: o.Jitter, rand: func(d time.Duration) time.Duration { return rand.N(d) }}}
	return s.run()
}

func (s *supervisor) run() int {
	// The child gets SIGKILL if this thread dies (PR_SET_PDEATHSIG is per forking thread): every
	// fork happens on this locked thread, which lives until the process exits.
	runtime.LockOSThread()
	if os.Getpid() != 1 {
		// Orphaned descendants are reparented to keyward-env, which reaps them, as PID 1 would.
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			s.logf("cannot become a subreaper (%v): orphans go to the namespace's init", err)
		}
	}
	sigs := make(chan os.Signal, 128)
	signal.Notify(sigs)
	defer signal.Stop(sigs)

	changes := make(chan struct{}, 1)
	w, err := watch(s.o.From, changes)
	if err != nil {
		s.logf("cannot watch %s for changes: %v", s.o.From, err)
		return ExitInternal
	}
	defer w.Close()
	// A swap between Load and the watch would be missed: look once now.
	changes <- struct{}{}

	if err := s.start(s.cur); err != nil {
		s.logf("%v", err)
		return ExitCode(err)
	}
	s.thr.done(s.now()) // the start counts as an action

	var actTimer, killTimer *time.Timer
	var actC, killC <-chan time.Time
	defer func() {
		if actTimer != nil {
			actTimer.Stop()
		}
		if killTimer != nil {
			killTimer.Stop()
		}
	}()
	for {
		select {
		case sig := <-sigs:
			switch sig {
			case unix.SIGCHLD:
				code, exited := s.reap()
				if !exited {
					continue
				}
				if killTimer != nil {
					killTimer.Stop()
					killTimer, killC = nil, nil
				}
				if !s.restarting || s.stopping {
					return code
				}
				s.restarting = false
				if err := s.start(s.next); err != nil {
					s.logf("%v", err)
					return ExitCode(err)
				}
				s.cur, s.next = s.next, nil
				s.thr.done(s.now())
				s.logf("started the application again (pid %d) with the new environment", s.pid)
			case unix.SIGURG:
				// The Go runtime's preemption signal: not forwarded.
			default:
				if sig == unix.SIGTERM || sig == unix.SIGINT {
					s.stopping = true
					if actTimer != nil {
						actTimer.Stop()
						actTimer, actC = nil, nil
					}
				}
				if s.pid > 0 {
					unix.Kill(s.pid, sig.(syscall.Signal))
				}
			}
		case <-changes:
			if actC != nil || s.stopping {
				continue // an action is already due: it reads the volume as it is then
			}
			p, err := currentPayload(s.o.From)
			if err == nil && p == s.cur.Payload && s.next == nil {
				continue
			}
			at := s.thr.at(s.now())
			d := at.Sub(s.now())
			s.logf("the volume %s changed; checking it in %s", s.o.From, d.Round(time.Millisecond))
			actTimer = time.NewTimer(d)
			actC = actTimer.C
		case <-actC:
			actTimer, actC = nil, nil
			if s.restarting || s.stopping {
				continue
			}
			if s.act() && s.o.OnChange == ModeRestart {
				killTimer = time.NewTimer(s.o.StopTimeout)
				killC = killTimer.C
			}
		case <-killC:
			killTimer, killC = nil, nil
			if s.pid > 0 {
				s.logf("the application (pid %d) did not stop within %s: SIGKILL", s.pid, s.o.StopTimeout)
				unix.Kill(s.pid, unix.SIGKILL)
			}
		}
	}
}

// act re-reads the volume and restarts or signals the child if its variables (restart) or the
// volume (signal) changed. It reports whether it began a restart.
func (s *supervisor) act() bool {
	snap, err := s.load(s.o)
	if err != nil {
		s.logf("the volume changed but reading it failed; the application (pid %d) keeps running as it is: %v", s.pid, err)
		return false
	}
	now := s.now()
	switch s.o.OnChange {
	case ModeRestart:
		changed := s.cur.Changed(snap)
		if len(changed) == 0 {
			s.cur.Payload = snap.Payload
			s.logf("the volume changed, the variables did not: no restart")
			return false
		}
		s.next, s.restarting = snap, true
		s.thr.done(now)
		s.logf("restarting the application (pid %d): %s changed; SIGTERM, SIGKILL after %s", s.pid, strings.Join(changed, ", "), s.o.StopTimeout)
		unix.Kill(s.pid, unix.SIGTERM)
		return true
	case ModeSignal:
		if snap.Payload == s.cur.Payload {
			return false
		}
		s.cur = snap
		s.thr.done(now)
		s.logf("the volume changed: sent %s to the application (pid %d)", unix.SignalName(s.o.Signal), s.pid)
		unix.Kill(s.pid, s.o.Signal)
	}
	return false
}

// start forks and execs the program with snap's variables.
func (s *supervisor) start(snap *Snapshot) error {
	pid, err := syscall.ForkExec(s.path, s.o.Command, &syscall.ProcAttr{
		Env:   snap.Environ(s.base),
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL},
	})
	if err != nil {
		return execErr(s.path, err)
	}
	s.pid = pid
	return nil
}

// reap collects every exited child. When the application is among them it returns its exit code
// (the status, or 128+N for signal N) and true.
func (s *supervisor) reap() (int, bool) {
	code, exited := 0, false
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return code, exited
		}
		if pid != s.pid {
			continue // an orphan reparented to us
		}
		switch {
		case ws.Exited():
			code = ws.ExitStatus()
		case ws.Signaled():
			code = 128 + int(ws.Signal())
		default:
			continue // stopped or continued: still ours
		}
		s.pid, exited = 0, true
	}
}

// currentPayload is where the volume's "..data" points now.
func currentPayload(dir string) (string, error) {
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	return readlinkAt(fd, dataLink)
}

// watch reports on changes every event on the volume's root that names "..data" (the broker's
// swap is a rename onto it; a withdrawal removes it), and a queue overflow. Close stops it.
func watch(dir string, changes chan<- struct{}) (io.Closer, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	mask := uint32(unix.IN_MOVED_TO | unix.IN_CREATE | unix.IN_DELETE | unix.IN_ONLYDIR | unix.IN_DONT_FOLLOW)
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("inotify watch: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking: reads go through the runtime's poller
	go func() {
		buf := make([]byte, 64*1024)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			notify := false
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				// struct inotify_event: wd, mask, cookie, len, then len bytes of NUL-padded name.
				mask := binary.NativeEndian.Uint32(buf[off+4:])
				nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
				start := off + unix.SizeofInotifyEvent
				if start+nameLen > n {
					break
				}
				name := strings.TrimRight(string(buf[start:start+nameLen]), "\x00")
				if name == dataLink || mask&unix.IN_Q_OVERFLOW != 0 {
					notify = true
				}
				off = start + nameLen
			}
			if notify {
				select {
				case changes <- struct{}{}:
				default:
				}
			}
		}
	}()
	return f, nil
}
