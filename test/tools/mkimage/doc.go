// Command mkimage builds Keyward's container images (`make images`): OCI image layouts under
// -out (bin/images/NAME/, for `crane push`) and the same as tars (bin/images/NAME.tar, for
// `ctr -n k8s.io images import`), and prints each image's reference, digest and size. The images,
// and what makes them reproducible, are test/images's.
//
// It may import the standard library and the module's test/images.
package main
