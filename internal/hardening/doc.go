// Package hardening holds the process-wide protections both Keyward daemons apply at start: no core
// dumps (a dump would write the secrets, tokens and PINs in memory to disk).
//
// It may import the standard library and golang.org/x/sys/unix.
package hardening
