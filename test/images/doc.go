// Package images builds Keyward's container images as OCI image layouts and tarballs, with
// go-containerregistry, from binaries it builds from this tree: keyward-broker (static),
// keyward-kms (cgo: the shared libraries its ELF file names, found with ldd, and the dynamic
// loader), and two test images for the real-node e2e: pause (containerd's sandbox image) and
// secretcheck (the workload that proves a secrets volume from inside a pod). Build is
// reproducible: the same tree and Meta give the same digests (fixed timestamps, sorted tar entries,
// fixed ownership, -trimpath -buildvcs=false builds). test/tools/mkimage is its command line
// (`make images`); tests that need an image call Build.
//
// It may import the standard library and github.com/google/go-containerregistry.
package images
