// Command keywardctl is Keyward's operator CLI: HSM keys, encryption coverage, audit verification.
//
// It may import any Keyward package and the etcd client; each subcommand is a thin layer over one.
package main
