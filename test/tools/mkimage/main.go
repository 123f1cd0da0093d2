package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/keyward/keyward/test/images"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run() error {
	meta, err := images.DefaultMeta(".")
	if err != nil {
		return err
	}
	o := images.Options{ModuleDir: ".", Meta: meta, Log: os.Stderr}
	var created int64
	var moduleDeps string
	flag.StringVar(&o.OutDir, "out", "bin/images", "where the layouts and tars go")
	flag.StringVar(&o.Repository, "repository", "keyward", "the images' name prefix")
	flag.StringVar(&o.Tag, "tag", "dev", "the tag the images are named with (not part of the digest)")
	flag.StringVar(&o.Source, "source", meta.Source, "org.opencontainers.image.source")
	flag.StringVar(&o.Revision, "revision", meta.Revision, "org.opencontainers.image.revision (default: the commit)")
	flag.StringVar(&o.Version, "version", meta.Version, "org.opencontainers.image.version, also linked into the binaries (default: git describe)")
	flag.Int64Var(&created, "created", meta.Created.Unix(), "every timestamp in the images, in Unix seconds (default: $SOURCE_DATE_EPOCH, else the commit's time)")
	flag.StringVar(&moduleDeps, "module-deps", "", "comma-separated PKCS#11 modules whose shared libraries the keyward-kms image carries (the modules are mounted from the host)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: go run ./test/tools/mkimage [flags] [IMAGE...]\nimages: %s (default: all)\n", strings.Join(images.Names(), ", "))
		flag.PrintDefaults()
	}
	flag.Parse()
	o.Created = time.Unix(created, 0).UTC()
	o.Images = flag.Args()
	for _, m := range strings.Split(moduleDeps, ",") {
		if m = strings.TrimSpace(m); m != "" {
			if _, err := os.Stat(m); err != nil {
				return fmt.Errorf("-module-deps: %w", err)
			}
			o.ModuleDeps = append(o.ModuleDeps, m)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	results, err := images.Build(ctx, o)
	if err != nil {
		return err
	}
	fmt.Printf("%-40s %-72s %10s %10s  %s\n", "IMAGE", "DIGEST", "TAR", "FILES", "USER")
	for _, r := range results {
		fmt.Printf("%-40s %-72s %9.1fM %9.1fM  %s\n", r.Ref, r.Digest, mib(r.TarSize), mib(r.Content), r.User)
	}
	fmt.Printf("layouts and tars in %s (created %s, revision %s, version %s)\n", o.OutDir, o.Created.Format(time.RFC3339), o.Revision, o.Version)
	return nil
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
