package version

// Version is the Keyward release, "dev" for an unreleased build.
var Version = "dev"
