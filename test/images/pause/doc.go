// Command pause is the sandbox ("pause") image's only program: it waits for SIGTERM or SIGINT and
// exits 0, reaping orphaned children meanwhile (it is PID 1 of a pod that shares its PID namespace).
// The real-node harness names its image as containerd's CRI sandbox_image, so a node needs no
// registry. Built statically (CGO_ENABLED=0) into the keyward/pause image by test/images.
//
// It may import the standard library only.
package main
