// Command keywardctl is Keyward's operator CLI: HSM keys, encryption coverage, audit verification,
// and the client of Keyward's API (audit follow, volumes, status, who-has --live).
//
// It may import any Keyward package, the etcd client and client-go; each subcommand is a thin layer
// over one.
package main
