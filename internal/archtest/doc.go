// Package archtest holds the tests that keep Keyward's package boundaries: each package imports only
// what its doc.go allows (the table in arch_test.go is its machine-checked copy), the shared kernel
// and the domain link no protocol stacks, the KMS tree does not depend on the secrets broker, and only
// kms/pkcs11 links cgo.
//
// It may import the standard library only (it runs `go list`).
package archtest
