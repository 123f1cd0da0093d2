// Package tmpfs mounts size-bounded tmpfs volumes and writes files into them atomically (a payload
// directory swapped in by a symlink rename, as kubelet's AtomicWriter does), never following a link
// it did not create: every operation inside a volume is relative to the descriptor of the volume's
// root and resolved with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV); reads and
// scrubs are bounded and touch regular files only.
//
// It may import the standard library and golang.org/x/sys/unix.
package tmpfs
