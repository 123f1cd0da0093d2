package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/keyward/keyward/broker"
	"github.com/keyward/keyward/broker/policy"
	"github.com/keyward/keyward/csi"
)

// errDenied is a policy decision of deny (exit 1, like any finding).
var errDenied = errors.New("denied")

func policyCommand(e streams, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("policy: want check or lint: %w", errUsage)
	}
	switch args[0] {
	case "lint":
		pos, err := parse(newFlags("policy lint", e), args[1:])
		if err != nil {
			return err
		}
		if len(pos) != 1 {
			return fmt.Errorf("policy lint takes one FILE: %w", errUsage)
		}
		p, err := policy.Load(pos[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "%s: valid (%d environments, %d grants, hash %s)\n", pos[0], len(p.Environments), len(p.Grants), p.Hash())
		return nil
	case "check":
		fs := newFlags("policy check", e)
		file := fs.String("policy", "/etc/keyward/policy.yaml", "policy file")
		ns := fs.String("namespace", "", "the pod's namespace")
		envName := fs.String("environment", "", "the namespace's keyward.dev/environment label (empty: none)")
		sa := fs.String("service-account", "", "the pod's service account")
		ref := fs.String("ref", "", "the ref the pod asks for, e.g. payments/db")
		key := fs.String("key", "value", "the key inside the secret")
		secrets := fs.String("secrets", "", "instead of --ref and --key: a file holding a volume's secrets list (its secrets attribute); every ref and key it reads is checked, templates' included")
		if _, err := parse(fs, args[1:]); err != nil {
			return err
		}
		if *ns == "" || *sa == "" || (*ref == "") == (*secrets == "") {
			return fmt.Errorf("--namespace, --service-account and one of --ref or --secrets are required: %w", errUsage)
		}
		p, err := policy.Load(*file)
		if err != nil {
			return err
		}
		a := policy.NewAuthorizer(p, policy.StaticNamespaces{*ns: *envName})
		id := broker.Identity{Namespace: *ns, ServiceAccount: *sa}
		if *secrets != "" {
			return checkSecrets(e, a, id, *secrets)
		}
		sref := broker.SecretRef{Ref: *ref, Key: *key}
		// The broker validates every ref before its Authorizer sees one (Service.authorize); the dry
		// run does the same, or it would allow what the broker refuses.
		if err := sref.Validate(); err != nil {
			fmt.Fprintf(e.stdout, "deny: %v\n", err)
			return errDenied
		}
		r, err := a.Authorize(context.Background(), id, sref)
		if err != nil {
			fmt.Fprintf(e.stdout, "deny: %v\n", err)
			return errDenied
		}
		fmt.Fprintf(e.stdout, "allow: %s\nreads Vault %s/data/%s key %q (environment %s)\n", r.Reason, r.Mount, r.Path, r.Key, r.Environment)
		return nil
	default:
		return fmt.Errorf("policy: unknown command %q: %w", args[0], errUsage)
	}
}

// checkSecrets is policy check --secrets: the volume's list parsed as a publish parses it (an invalid
// entry is a deny, as the broker refuses it), then each ref and key it reads, one line each. A
// publish needs them all: one deny denies the whole volume.
func checkSecrets(e streams, a *policy.Authorizer, id broker.Identity, path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	refs, err := csi.SecretsRefs(string(raw))
	if err != nil {
		fmt.Fprintf(e.stdout, "deny: %v\n", err)
		return errDenied
	}
	denied := false
	for _, ref := range refs {
		r, err := a.Authorize(context.Background(), id, ref)
		if err != nil {
			denied = true
			fmt.Fprintf(e.stdout, "deny: %s: %v\n", ref, err)
			continue
		}
		fmt.Fprintf(e.stdout, "allow: %s: %s; reads Vault %s/data/%s key %q (environment %s)\n", ref, r.Reason, r.Mount, r.Path, r.Key, r.Environment)
	}
	if denied {
		return errDenied
	}
	return nil
}
