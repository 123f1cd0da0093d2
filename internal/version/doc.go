// Package version holds the build version of Keyward's binaries, set at link time with
// -ldflags "-X github.com/keyward/keyward/internal/version.Version=...".
//
// It may import the standard library only.
package version
