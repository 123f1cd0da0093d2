package main

import (
	"os"

	"github.com/keyward/keyward/internal/envexec"
	"github.com/keyward/keyward/internal/version"
)

func main() {
	os.Exit(envexec.Main(os.Args[1:], version.Version, os.Stdout, os.Stderr))
}
