// Package tmpfs mounts size-bounded tmpfs volumes and writes files into them atomically (a payload
// directory swapped in by a symlink rename, as kubelet's AtomicWriter does).
//
// It may import the standard library and golang.org/x/sys/unix.
package tmpfs
