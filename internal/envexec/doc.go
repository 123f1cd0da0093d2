// Package envexec is keyward-env: it runs an application with environment variables read from a
// Keyward secrets volume (a read-only tmpfs that keyward-broker fills and swaps atomically through a
// "..data" link), without the values ever touching disk, argv or a message. It owns the volume's
// reader on the consuming side (read-only tmpfs check, one consistent payload, value checks), the
// variable names (explicit NAME=FILE, or every file under a prefix), the plain exec (same PID, no
// shell), the supervision mode (PID 1 duties: reaping, signal forwarding, exit status; inotify on
// "..data"; restart or signal with a minimum interval and jitter), the install mode that copies the
// binary into a shared emptyDir, and the exit codes.
//
// It may import the standard library and golang.org/x/sys/unix: keyward-env is a static binary
// that runs inside application pods.
package envexec
