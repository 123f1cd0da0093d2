package harness

import (
	"context"
	"errors"
	"os"
	"path/filepath"
)

// Env is a whole set of real components, for a TestMain shared by a package's tests (isolated by
// namespace and mount) or for the demo.
type Env struct {
	Dir   string
	Etcd  *Etcd
	Kube  *KubeAPIServer
	Vault *Vault
}

// EnvOptions choose what StartEnv starts. etcd always starts when Kube does.
type EnvOptions struct {
	Kube  bool
	Vault bool
	// KubeOptions are passed to the apiserver (Etcd is filled in).
	KubeOptions KubeOptions
}

// StartEnv starts the chosen components in a new short temporary directory. On error everything that
// started is stopped again.
func StartEnv(ctx context.Context, opts EnvOptions) (env *Env, err error) {
	dir, err := ShortTempDir("kw-env-")
	if err != nil {
		return nil, err
	}
	env = &Env{Dir: dir}
	defer func() {
		if err != nil {
			env.Stop()
			env = nil
		}
	}()
	mk := func(name string) (string, error) {
		d := filepath.Join(dir, name)
		return d, os.MkdirAll(d, 0o700)
	}
	if opts.Kube {
		d, err := mk("etcd")
		if err != nil {
			return env, err
		}
		if env.Etcd, err = StartEtcd(ctx, d); err != nil {
			return env, err
		}
		if d, err = mk("kube"); err != nil {
			return env, err
		}
		ko := opts.KubeOptions
		ko.Etcd = env.Etcd
		if env.Kube, err = StartKubeAPIServer(ctx, d, ko); err != nil {
			return env, err
		}
	}
	if opts.Vault {
		d, err := mk("vault")
		if err != nil {
			return env, err
		}
		if env.Vault, err = StartVault(ctx, d); err != nil {
			return env, err
		}
	}
	return env, nil
}

// Stop stops every component and removes the directory.
func (e *Env) Stop() {
	if e.Vault != nil {
		e.Vault.Stop()
	}
	if e.Kube != nil {
		e.Kube.Stop()
	}
	if e.Etcd != nil {
		e.Etcd.Stop()
	}
	os.RemoveAll(e.Dir)
}

// MissingIsSkip reports whether err is a missing component that the developer allowed to skip.
func MissingIsSkip(err error) bool { return errors.Is(err, ErrMissing) && AllowSkip() }
