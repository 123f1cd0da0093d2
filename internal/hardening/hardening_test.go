package hardening

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The settings are process-wide and permanent, so they are applied in a child process (this test
// binary, re-executed), never in the test process itself.
func TestDisableCoreDumps(t *testing.T) {
	if os.Getenv("KEYWARD_HARDENING_CHILD") == "1" {
		if err := DisableCoreDumps(); err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		d, lim, err := Dumpable()
		if err != nil || d || lim != 0 {
			os.Stdout.WriteString("after: still dumpable\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("after: not dumpable, core limit 0\n")
		os.Exit(0)
	}
	if d, _, err := Dumpable(); err != nil || !d {
		t.Fatalf("the test process is not dumpable to begin with (%v): the check below could not fail", err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestDisableCoreDumps$")
	cmd.Env = append(os.Environ(), "KEYWARD_HARDENING_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "after: not dumpable, core limit 0") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}
