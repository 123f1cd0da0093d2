package logging

import (
	"testing"

	"go.uber.org/zap/zapcore"
)

func TestNewLevels(t *testing.T) {
	for _, lvl := range []zapcore.Level{zapcore.DebugLevel, zapcore.InfoLevel, zapcore.WarnLevel, zapcore.ErrorLevel} {
		l, err := New(lvl.String())
		if err != nil {
			t.Fatalf("%s: %v", lvl, err)
		}
		if !l.Core().Enabled(lvl) {
			t.Fatalf("%s: level not enabled", lvl)
		}
		if lvl > zapcore.DebugLevel && l.Core().Enabled(lvl-1) {
			t.Fatalf("%s logger also logs %s", lvl, lvl-1)
		}
	}
	if _, err := New("loud"); err == nil {
		t.Fatal("unknown level accepted")
	}
}
