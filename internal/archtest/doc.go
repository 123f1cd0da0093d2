// Package archtest holds tests that keep Keyward's package boundaries (see each package's doc.go):
// the broker domain never depends on protocol packages, and only kms/pkcs11 uses cgo.
package archtest
