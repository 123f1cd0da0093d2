package envexec

import (
	"io"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string // in the error
	}{
		{[]string{"--from", "/s", "--env", "DB_PASSWORD=db-password", "--", "app", "-x"}, 0, ""},
		{[]string{"--from", "/s", "--env-all-prefix", "APP_", "app"}, 0, ""},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "signal:HUP", "--", "app"}, 0, ""},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "signal:SIGUSR1", "--", "app"}, 0, ""},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "restart", "--min-interval", "0", "--jitter", "0", "--", "app"}, 0, ""},
		{[]string{"--env", "A=a", "--", "app"}, ExitUsage, "--from DIR is required"},
		{[]string{"--from", "/s", "--env", "A=a"}, ExitUsage, "no program"},
		{[]string{"--from", "/s", "--", "app"}, ExitUsage, "nothing to set"},
		{[]string{"--from", "/s", "--env", "1A=a", "--", "app"}, ExitUsage, "not a valid environment variable name"},
		{[]string{"--from", "/s", "--env", "DB-PASSWORD=a", "--", "app"}, ExitUsage, "not a valid environment variable name"},
		{[]string{"--from", "/s", "--env", "=a", "--", "app"}, ExitUsage, "not a valid environment variable name"},
		{[]string{"--from", "/s", "--env", "A", "--", "app"}, ExitUsage, "want NAME=FILE"},
		{[]string{"--from", "/s", "--env", "A=a", "--env", "A=b", "--", "app"}, ExitUsage, "given twice"},
		{[]string{"--from", "/s", "--env", "A=../etc/passwd", "--", "app"}, ExitUsage, "cannot be a file of the volume"},
		{[]string{"--from", "/s", "--env", "A=..data", "--", "app"}, ExitUsage, "cannot be a file of the volume"},
		{[]string{"--from", "/s", "--env-all-prefix", "", "--", "app"}, ExitUsage, "the prefix must itself be a valid variable name"},
		{[]string{"--from", "/s", "--env-all-prefix", "9X", "--", "app"}, ExitUsage, "the prefix must itself be a valid variable name"},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "signal:KILL", "--", "app"}, ExitUsage, "unknown signal"},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "signal:NOPE", "--", "app"}, ExitUsage, "unknown signal"},
		{[]string{"--from", "/s", "--env", "A=a", "--on-change", "always", "--", "app"}, ExitUsage, "want none, restart"},
		{[]string{"--from", "/s", "--env", "A=a", "--jitter", "-1s", "--", "app"}, ExitUsage, "must not be negative"},
		{[]string{"--nope"}, ExitUsage, "flag provided but not defined"},
	} {
		o, err := Parse(tc.args, io.Discard)
		if got := ExitCode(err); got != tc.code || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%q: exit %d (%v), want %d with %q", tc.args, got, err, tc.code, tc.want)
		}
		if err == nil && o.Command[0] != "app" {
			t.Errorf("%q: command %q", tc.args, o.Command)
		}
	}
	o, err := Parse([]string{"--from", "/s", "--env", "A=a", "--on-change", "signal:HUP", "--", "app"}, io.Discard)
	if err != nil || o.OnChange != ModeSignal || o.Signal != syscall.SIGHUP || o.MinInterval != 30*time.Second || o.Jitter != 30*time.Second {
		t.Errorf("defaults: %+v, %v", o, err)
	}
}

func TestPrefixedName(t *testing.T) {
	for file, want := range map[string]string{
		"db-password": "APP_DB_PASSWORD", "tls.crt": "APP_TLS_CRT", "Mixed_Case9": "APP_MIXED_CASE9", ".env": "APP__ENV",
		"db pass": "", "db@pass": "", "ключ": "", "a=b": "",
	} {
		got, ok := PrefixedName("APP_", file)
		if want == "" && ok || want != "" && got != want {
			t.Errorf("PrefixedName(APP_, %q) = %q, %v; want %q", file, got, ok, want)
		}
	}
}

// The throttle acts no sooner than MinInterval after the last action (the start counts), plus a
// jitter below Jitter: with an injected clock and random source, no sleeps.
func TestThrottleHonorsMinimumIntervalAndJitter(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var asked []time.Duration
	th := throttle{min: time.Minute, jitter: 10 * time.Second, last: start,
		rand: func(d time.Duration) time.Duration { asked = append(asked, d); return 3 * time.Second }}
	// A change 5 s after the start waits for the minimum interval, plus the jitter.
	if at := th.at(start.Add(5 * time.Second)); !at.Equal(start.Add(63 * time.Second)) {
		t.Errorf("first action at +%s, want +63s", at.Sub(start))
	}
	th.done(start.Add(63 * time.Second))
	// A change long after the last action acts at once, plus the jitter.
	if at := th.at(start.Add(10 * time.Minute)); !at.Equal(start.Add(10*time.Minute + 3*time.Second)) {
		t.Errorf("late action at +%s, want +10m3s", at.Sub(start))
	}
	// Right after an action: the next waits a full interval from it.
	if at := th.at(start.Add(64 * time.Second)); !at.Equal(start.Add(63*time.Second + time.Minute + 3*time.Second)) {
		t.Errorf("second action at +%s, want +2m6s", at.Sub(start))
	}
	for _, d := range asked {
		if d != 10*time.Second {
			t.Errorf("jitter drawn below %s, want below the flag's 10s", d)
		}
	}
	none := throttle{min: 0, jitter: 0, last: start, rand: func(time.Duration) time.Duration { t.Fatal("no jitter asked for"); return 0 }}
	if at := none.at(start.Add(time.Second)); !at.Equal(start.Add(time.Second)) {
		t.Errorf("no interval, no jitter: at +%s", at.Sub(start))
	}
}

func TestExitCodesAreDistinct(t *testing.T) {
	seen := map[int]error{}
	for _, e := range []error{ErrUsage, ErrVolume, ErrMissing, ErrValue, ErrInternal, ErrNotExecutable, ErrNotFound, ErrInstall} {
		code := ExitCode(fail(e, "x"))
		if prev, ok := seen[code]; ok {
			t.Errorf("%v and %v both exit %d", prev, e, code)
		}
		seen[code] = e
	}
}
