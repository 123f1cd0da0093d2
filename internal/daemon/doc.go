// Package daemon is the main of Keyward's daemons, once: flags, --version, option validation, the
// logger, run, and the exit codes (0 done, 1 failed, 2 bad usage), so each cmd/ main is a few lines.
//
// It may import the standard library, zap, internal/logging and internal/version.
package daemon
