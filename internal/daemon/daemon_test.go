package daemon

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestExitCodes(t *testing.T) {
	var level, socket string
	spec := func(runErr error) Spec {
		return Spec{Name: "keyward-test", LogLevel: &level,
			Bind: func(fs *flag.FlagSet) {
				fs.StringVar(&level, "log-level", "error", "")
				fs.StringVar(&socket, "socket", "", "")
			},
			Validate: func() error {
				if socket == "" {
					return errors.New("--socket is required")
				}
				return nil
			},
			Run: func(*zap.Logger) error { return runErr }}
	}
	for _, tc := range []struct {
		args []string
		err  error
		code int
		out  string
	}{
		{[]string{"--socket", "/s"}, nil, 0, ""},
		{[]string{"--socket", "/s"}, errors.New("boom"), 1, ""},
		{[]string{}, nil, 2, "--socket is required"},
		{[]string{"--bogus"}, nil, 2, "bogus"},
		{[]string{"--socket", "/s", "--log-level", "loud"}, nil, 2, "keyward-test:"},
		{[]string{"--version"}, nil, 0, "keyward-test"},
	} {
		socket = ""
		var stdout, stderr bytes.Buffer
		if code := run(spec(tc.err), tc.args, &stdout, &stderr); code != tc.code || !strings.Contains(stdout.String()+stderr.String(), tc.out) {
			t.Errorf("%v: exit %d (%s%s), want %d mentioning %q", tc.args, code, stdout.String(), stderr.String(), tc.code, tc.out)
		}
	}
}
