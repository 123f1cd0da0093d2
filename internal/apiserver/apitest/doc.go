// Package apitest makes a throwaway PKI for tests of Keyward's API (internal/apiserver): a client CA,
// a server certificate for the loopback addresses, and client certificates by common name, written
// as PEM files into a test's directory.
//
// It may import the standard library only.
package apitest
